//! The monitor: turns a discrepancy signal into a correction run.
//!
//! The bridge verifies results as they arrive, but only a sample of them (`verify.sample`),
//! and only those whose previous reading it knows. When the share of incorrect results among
//! the verified ones over an interval passes `monitor.discrepancy_threshold`, something is
//! systematically wrong at a gateway (an outdated calculation, a bad build): the monitor then
//! re-verifies *every* stored result of the gateways concerned, from yesterday on, and corrects
//! what it finds ([`crate::correction::run`]; at most once per event, safe beside other
//! bridges doing the same). The same run can be started by a CloudWatch alarm on the
//! `discrepancy_rate` metric through the Lambda handler, or by `cloud-bridge correct`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::MonitorConfig;
use crate::correction::run::RunReport;
use crate::layout::date_of;
use crate::pipeline::Pipeline;
use crate::verify::Verifier;

#[derive(Debug)]
pub struct Monitor {
    p: Pipeline,
    verifier: Arc<Verifier>,
    cfg: MonitorConfig,
    /// (verified, incorrect) totals at the last tick.
    last: Mutex<(u64, u64)>,
    /// Gateway → when its last run started (cool-down).
    runs: Mutex<HashMap<String, Instant>>,
}

impl Monitor {
    /// None when the bridge does not verify (nothing to watch).
    pub fn new(p: Pipeline) -> Option<Monitor> {
        let verifier = Arc::clone(p.verifier.as_ref()?);
        Some(Monitor {
            cfg: p.cfg.monitor.clone(),
            verifier,
            p,
            last: Mutex::new((0, 0)),
            runs: Mutex::new(HashMap::new()),
        })
    }

    /// One look at the counters since the last tick; runs corrections if they call for it.
    pub async fn tick(&self) -> anyhow::Result<Vec<(String, RunReport)>> {
        let m = &self.p.metrics;
        let (verified, incorrect) = (
            m.get(crate::metrics::VERIFIED),
            m.get(crate::metrics::INCORRECT),
        );
        let (dv, di) = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let d = (verified - last.0, incorrect - last.1);
            *last = (verified, incorrect);
            d
        };
        let gateways = self.verifier.take_discrepant();
        if dv < self.cfg.min_verified || (di as f64) < self.cfg.discrepancy_threshold * dv as f64 {
            return Ok(vec![]);
        }
        let rate = di as f64 / dv as f64;
        let mut out = Vec::new();
        for g in gateways {
            let due = {
                let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let cool = Duration::from_secs(self.cfg.cooldown_s);
                match runs.get(&g) {
                    Some(t) if now.duration_since(*t) < cool => false,
                    _ => {
                        runs.insert(g.clone(), now);
                        true
                    }
                }
            };
            if !due {
                continue;
            }
            warn!(gateway = %g, discrepancy_rate = rate, verified = dv, incorrect = di,
                "discrepancy over the threshold: correction run over the gateway's results since yesterday");
            let since = date_of(crate::now_ms() - 86_400_000);
            let report = self
                .p
                .correction_run()?
                .days(&since, None, Some(&g), "monitor")
                .await?;
            info!(gateway = %g, ?report, "correction run finished");
            out.push((g, report));
        }
        Ok(out)
    }

    /// Ticks every `monitor.interval_s` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_secs(self.cfg.interval_s));
        every.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {
                    if let Err(e) = self.tick().await {
                        warn!("monitor: {e:#}");
                    }
                }
            }
        }
    }
}
