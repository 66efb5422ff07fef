//! A watchdog for what no collective timeout catches: an NCCL kernel that never finishes (a rank
//! died inside a collective, or hangs) blocks this rank's stream forever. The trainer beats at
//! every phase of a step (train, checkpoint, eval); a thread checks once a second and, when no
//! beat came for `PITH_NCCL_TIMEOUT` seconds (default 600), says which phase hung and ends the
//! process, so a job under `pith launch`, torchrun or Slurm fails instead of holding its GPUs.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub struct Watchdog {
    last: Arc<Mutex<(Instant, String)>>,
}

impl Watchdog {
    /// Start the checking thread; `fire` runs once, with the message, when a phase overruns.
    pub fn start(timeout: Duration, fire: impl FnOnce(String) + Send + 'static) -> Watchdog {
        let last = Arc::new(Mutex::new((Instant::now(), "start-up".to_string())));
        let seen = last.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(timeout.min(Duration::from_secs(1)));
            let (at, what) = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if Arc::strong_count(&seen) == 1 {
                return; // the watchdog was dropped
            }
            if at.elapsed() > timeout {
                let s = timeout.as_secs_f64();
                return fire(format!(
                    "{what} has not finished in {s} s (PITH_NCCL_TIMEOUT): a collective is stuck — another rank died or hangs; ending this rank"
                ));
            }
        });
        Watchdog { last }
    }
    /// A phase begins (e.g. `step 12`, `checkpoint at step 12`).
    pub fn beat(&self, what: String) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = (Instant::now(), what);
    }
}

/// PITH_NCCL_TIMEOUT seconds (default 600).
pub fn timeout(env: Option<String>) -> Result<Duration, String> {
    super::seconds("PITH_NCCL_TIMEOUT", env.as_deref(), 600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn fires_once_a_phase_overruns_and_not_while_beating() {
        let (tx, rx) = mpsc::channel();
        let w = Watchdog::start(Duration::from_millis(300), move |m| tx.send(m).unwrap());
        for i in 0..6 {
            std::thread::sleep(Duration::from_millis(100));
            w.beat(format!("step {i}"));
        }
        assert!(rx.try_recv().is_err(), "fired while beating");
        let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(m.starts_with("step 5 has not finished in 0.3 s (PITH_NCCL_TIMEOUT)"), "{m}");
        assert_eq!(timeout(None).unwrap(), Duration::from_secs(600));
        assert!(timeout(Some("x".into())).unwrap_err().contains("PITH_NCCL_TIMEOUT=x"));
    }
}
