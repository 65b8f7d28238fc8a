//! `cjepa dag --format mermaid|dot`.

use super::Plan;

/// Mermaid flowchart of the instances.
pub fn mermaid(plan: &Plan) -> String {
    let node = |i, id: &str, kind: &str, key: &str| {
        format!("  s{i}[\"{id}<br/><small>{kind} {key}</small>\"]\n")
    };
    let edge = |a, b| format!("  s{a} --> s{b}\n");
    format!("flowchart LR\n{}", graph(plan, node, edge))
}

/// Graphviz dot of the instances.
pub fn dot(plan: &Plan) -> String {
    let node =
        |i, id: &str, kind: &str, key: &str| format!("  s{i} [label=\"{id}\\n{kind} {key}\"];\n");
    let edge = |a, b| format!("  s{a} -> s{b};\n");
    format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n{}}}\n",
        esc(&plan.pipeline.name),
        graph(plan, node, edge)
    )
}

/// One `node(index, id, kind, short key)` line per stage, then one `edge(from, to)` per arrow.
fn graph(
    plan: &Plan,
    node: impl Fn(usize, &str, &str, &str) -> String,
    edge: impl Fn(usize, usize) -> String,
) -> String {
    let mut s = String::new();
    for (i, st) in plan.stages.iter().enumerate() {
        s.push_str(&node(i, &esc(&st.inst.id), st.kind.name(), &st.key[..8]));
    }
    for e in plan.graph.edge_indices() {
        let (a, b) = plan.graph.edge_endpoints(e).expect("edge");
        s.push_str(&edge(a.index(), b.index()));
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('"', "'")
}
