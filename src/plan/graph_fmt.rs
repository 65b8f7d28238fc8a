//! `cjepa dag --format mermaid|dot`.

use super::Plan;

/// Mermaid flowchart of the instances.
pub fn mermaid(plan: &Plan) -> String {
    let mut s = String::from("flowchart LR\n");
    for (i, st) in plan.stages.iter().enumerate() {
        s.push_str(&format!(
            "  s{i}[\"{}<br/><small>{} {}</small>\"]\n",
            esc(&st.inst.id),
            st.kind.name(),
            &st.key[..8]
        ));
    }
    for e in plan.graph.edge_indices() {
        let (a, b) = plan.graph.edge_endpoints(e).expect("edge");
        s.push_str(&format!("  s{} --> s{}\n", a.index(), b.index()));
    }
    s
}

/// Graphviz dot of the instances.
pub fn dot(plan: &Plan) -> String {
    let mut s = format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n",
        esc(&plan.pipeline.name)
    );
    for (i, st) in plan.stages.iter().enumerate() {
        s.push_str(&format!(
            "  s{i} [label=\"{}\\n{} {}\"];\n",
            esc(&st.inst.id),
            st.kind.name(),
            &st.key[..8]
        ));
    }
    for e in plan.graph.edge_indices() {
        let (a, b) = plan.graph.edge_endpoints(e).expect("edge");
        s.push_str(&format!("  s{} -> s{};\n", a.index(), b.index()));
    }
    s.push_str("}\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('"', "'")
}
