//! `--only ID` (with its upstream) and `--force ID` (and its dependents). An ID is a stage id
//! (all of its instances) or an instance id (`stage[k=v]`).

use std::collections::BTreeSet;

use super::Plan;
use crate::error::{Error, Result};

/// Instance indices matching `id`.
pub fn matching(plan: &Plan, id: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = plan
        .stages
        .iter()
        .enumerate()
        .filter(|(_, s)| s.inst.id == id || s.inst.stage == id)
        .map(|(i, _)| i)
        .collect();
    if v.is_empty() {
        let names: BTreeSet<&str> = plan
            .stages
            .iter()
            .flat_map(|s| [s.inst.id.as_str(), s.inst.stage.as_str()])
            .collect();
        let hint = crate::util::suggest::did_you_mean(id, names.iter().copied());
        return Err(Error::Usage(format!(
            "no stage `{id}` in {}{hint}",
            plan.pipeline.file.display()
        )));
    }
    Ok(v)
}

/// The selected instances for `--only` (each with its whole upstream); all when `only` is empty.
pub fn only(plan: &Plan, only: &[String]) -> Result<BTreeSet<usize>> {
    if only.is_empty() {
        return Ok((0..plan.stages.len()).collect());
    }
    closure(plan, only, |i| {
        plan.stages[i]
            .inst
            .upstream
            .iter()
            .map(|(_, u)| *u)
            .collect()
    })
}

/// Instances forced to rerun: each match and all its dependents.
pub fn force(plan: &Plan, force: &[String]) -> Result<BTreeSet<usize>> {
    closure(plan, force, |i| plan.dependents(i))
}

/// The stages matching `ids` and every stage reached from them through `next`.
fn closure(
    plan: &Plan,
    ids: &[String],
    next: impl Fn(usize) -> Vec<usize>,
) -> Result<BTreeSet<usize>> {
    let mut out = BTreeSet::new();
    let mut stack = Vec::new();
    for id in ids {
        stack.extend(matching(plan, id)?);
    }
    while let Some(i) = stack.pop() {
        if out.insert(i) {
            stack.extend(next(i));
        }
    }
    Ok(out)
}
