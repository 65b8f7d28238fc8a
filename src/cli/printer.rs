//! Progress output: a bar per running stage on a terminal (indicatif), plain lines otherwise.

use std::collections::BTreeMap;

use cjepa::exec::core::{Event, Reporter};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct Printer {
    multi: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
    last_plain: BTreeMap<String, u64>,
}

impl Printer {
    pub fn new(tty: bool) -> Self {
        Printer {
            multi: tty.then(MultiProgress::new),
            bars: BTreeMap::new(),
            last_plain: BTreeMap::new(),
        }
    }

    fn line(&self, s: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => eprintln!("{s}"),
        }
    }

    pub fn finish(&mut self) {
        for (_, b) in std::mem::take(&mut self.bars) {
            b.finish_and_clear();
        }
    }
}

impl Reporter for Printer {
    fn event(&mut self, ev: Event) {
        match ev {
            Event::Warning(w) => self.line(format!("warning: {w}")),
            Event::Cached { id, key } => self.line(format!("cached   {id} ({})", &key[..12])),
            Event::Started {
                id,
                key,
                attempt,
                resume_step,
                log,
            } => {
                let resume = resume_step
                    .map(|s| format!(", resuming from step {s}"))
                    .unwrap_or_default();
                let att = if attempt > 1 {
                    format!(", attempt {attempt}")
                } else {
                    String::new()
                };
                self.line(format!(
                    "start    {id} ({}{att}{resume}) log: {}",
                    &key[..12],
                    log.display()
                ));
                if let Some(m) = &self.multi {
                    let b = m.add(ProgressBar::new(1));
                    b.set_style(
                        ProgressStyle::with_template(
                            "{prefix:30} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.set_prefix(id.clone());
                    self.bars.insert(id, b);
                }
            }
            Event::Submitted {
                id,
                job,
                earlier,
                log,
            } => {
                let how = if earlier {
                    "submitted earlier"
                } else {
                    "submitted"
                };
                self.line(format!(
                    "queued   {id} ({how} as Slurm job {job}) log: {}",
                    log.display()
                ));
            }
            Event::Progress {
                id,
                step,
                total,
                msg,
            } => {
                if let Some(b) = self.bars.get(&id) {
                    b.set_length(total.max(1));
                    b.set_position(step);
                    b.set_message(msg);
                } else if self.multi.is_none() {
                    // plain: a line per 10% step
                    let pct = if total > 0 { step * 10 / total } else { 0 };
                    if self.last_plain.get(&id) != Some(&pct) {
                        self.last_plain.insert(id.clone(), pct);
                        eprintln!("progress {id}: {step}/{total} {msg}");
                    }
                }
            }
            Event::Finished { id, secs, metrics } => {
                if let Some(b) = self.bars.remove(&id) {
                    b.finish_and_clear();
                }
                let m: Vec<String> = metrics
                    .iter()
                    .take(6)
                    .map(|(k, v)| format!("{k}={}", cjepa::report::table::fmt_num(*v)))
                    .collect();
                self.line(format!("done     {id} in {secs:.1}s {}", m.join(" ")));
            }
            Event::Failed {
                id,
                error,
                retrying,
                log,
            } => {
                if let Some(b) = self.bars.remove(&id) {
                    b.finish_and_clear();
                }
                let r = if retrying { " (retrying)" } else { "" };
                self.line(format!(
                    "FAILED   {id}{r}: {error} (log: {})",
                    log.display()
                ));
            }
            Event::Skipped { id, because } => {
                self.line(format!("skipped  {id}: upstream {because} failed"))
            }
            Event::Stopping => {
                self.line("interrupt: asking running stages to checkpoint and stop...".into())
            }
        }
    }
}
