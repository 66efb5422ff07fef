//! Knowing at once that another rank died. NCCL cannot tell: a rank killed inside a collective
//! leaves the others spinning in a kernel until the watchdog's `PITH_NCCL_TIMEOUT` (600 s),
//! and under Slurm nothing else ends them. So after the rendezvous every rank keeps one more
//! TCP connection with rank 0 that carries nothing but a goodbye: a rank that ends successfully
//! says it ([`goodbye`]); a connection that closes without one means the rank died (killed,
//! crashed, or ended with an error), and the rank on the other end stops at once, naming it.
//! Rank 0 first tells every other rank which rank it lost. The rank that sees a connection close
//! waits [`GRACE`] first, so one that is itself ending with an error (it saw the same failure in
//! a collective) prints its own line instead.

use super::Rendezvous;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const BYE: u8 = 0;
/// Followed by the lost rank (u32 LE).
const LOST: u8 = 1;
/// How long a rank that lost a peer waits for its own ending before it fires.
const GRACE: Duration = Duration::from_secs(2);

/// One rank's watch connections: rank 0 holds one per other rank, the others one to rank 0.
pub struct Watch {
    conns: Vec<(u32, Mutex<TcpStream>)>,
    leaving: AtomicBool,
}

static WATCH: OnceLock<Arc<Watch>> = OnceLock::new();

/// This rank's watch, for the rest of the process (the trainer's `ProcessGroup::init`).
pub fn install(watch: Arc<Watch>) {
    let _ = WATCH.set(watch);
}

/// The command succeeded: tell the other ranks this one is leaving on purpose.
pub fn goodbye() {
    if let Some(w) = WATCH.get() {
        w.goodbye();
    }
}

impl Watch {
    /// Connect (every rank, right after the rendezvous: rank 0 listens on a free port and sends
    /// it over the rendezvous) and start one thread per connection. `fire` runs once at most,
    /// with the line that says which rank is gone.
    pub fn start(rv: &mut Rendezvous, fire: impl Fn(String) + Send + Sync + 'static) -> Result<Arc<Watch>, String> {
        let (me, n) = (rv.world.rank, rv.world.size);
        let deadline = Instant::now() + rv.timeout;
        let mut conns = Vec::new();
        if me == 0 {
            let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(|e| format!("rank 0: watch listener: {e}"))?;
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            rv.broadcast(Some(&port.to_le_bytes()))?;
            while conns.len() + 1 < n as usize {
                let Some((mut s, _)) =
                    super::rendezvous::accept_until(&listener, deadline).map_err(|e| e.to_string())?
                else {
                    return Err(format!(
                        "rank 0: only {} of {} ranks opened their watch connection",
                        conns.len(),
                        n - 1
                    ));
                };
                let mut rank = [0u8; 4];
                s.set_read_timeout(Some(rv.timeout))
                    .and_then(|_| s.read_exact(&mut rank))
                    .map_err(|e| e.to_string())?;
                conns.push((u32::from_le_bytes(rank), Mutex::new(s)));
            }
        } else {
            let b = rv.broadcast(None)?;
            let port = u16::from_le_bytes([b[0], b[1]]);
            let target = format!("{}:{port}", rv.world.master_addr);
            let mut s = super::rendezvous::connect_until(&target, deadline)
                .ok_or(format!("rank {me}: could not open the watch connection to rank 0 at {target}"))?;
            s.write_all(&me.to_le_bytes()).map_err(|e| format!("rank {me}: watch connection: {e}"))?;
            conns.push((0, Mutex::new(s)));
        }
        let watch = Arc::new(Watch { conns, leaving: AtomicBool::new(false) });
        let fire = Arc::new(fire);
        for i in 0..watch.conns.len() {
            let (w, fire) = (watch.clone(), fire.clone());
            let mut s = w.conns[i].1.lock().unwrap().try_clone().map_err(|e| e.to_string())?;
            s.set_read_timeout(None).map_err(|e| e.to_string())?;
            std::thread::spawn(move || {
                let peer = w.conns[i].0;
                let mut b = [0u8; 5];
                let lost = match s.read(&mut b[..1]) {
                    Ok(1) if b[0] == BYE => return,
                    Ok(1) if b[0] == LOST && s.read_exact(&mut b[1..]).is_ok() => {
                        u32::from_le_bytes(b[1..].try_into().unwrap())
                    }
                    _ => peer,
                };
                if lost == peer {
                    std::thread::sleep(GRACE); // rank 0's word needs no second wait
                }
                if w.leaving.swap(true, Ordering::SeqCst) {
                    return; // this rank is leaving (or another thread already fired)
                }
                if me == 0 {
                    w.send(&[&[LOST][..], &lost.to_le_bytes()].concat());
                }
                let how = match lost == peer {
                    true => "its connection closed without a goodbye",
                    false => "rank 0 lost it",
                };
                fire(format!(
                    "rank {me}: rank {lost} died or ended with an error ({how}); ending this rank (its own output says why)"
                ));
            });
        }
        Ok(watch)
    }

    fn goodbye(&self) {
        if !self.leaving.swap(true, Ordering::SeqCst) {
            self.send(&[BYE]);
        }
    }

    /// What a killed process's connections do: close, with no goodbye (and no firing here).
    #[cfg(test)]
    fn die(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        for (_, s) in &self.conns {
            let _ = s.lock().unwrap().shutdown(std::net::Shutdown::Both);
        }
    }

    fn send(&self, bytes: &[u8]) {
        for (_, s) in &self.conns {
            let _ = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_all(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rendezvous::tests::ranks;
    use super::*;
    use std::sync::mpsc;

    /// Three ranks: rank 2 leaves without a goodbye (as a killed rank does), so rank 0 fires
    /// naming it and rank 1 hears it from rank 0; ranks that say goodbye fire nothing.
    #[test]
    fn a_rank_gone_without_a_goodbye_is_named_on_every_other_rank() {
        let (tx, rx) = mpsc::channel::<(u32, String)>();
        let tx = Mutex::new(tx);
        ranks(3, move |rv| {
            let mut rv = rv.unwrap();
            let me = rv.world.rank;
            let tx = tx.lock().unwrap().clone();
            let watch = Watch::start(&mut rv, move |m| tx.send((me, m)).unwrap()).unwrap();
            if me == 2 {
                watch.die();
            } else {
                std::thread::sleep(GRACE * 2);
                watch.goodbye();
            }
        });
        let mut fired: Vec<(u32, String)> = rx.try_iter().collect();
        fired.sort();
        assert_eq!(fired.len(), 2, "{fired:?}");
        assert!(fired[0].0 == 0 && fired[0].1.contains("rank 2 died") && fired[0].1.contains("without a goodbye"));
        assert!(fired[1].0 == 1 && fired[1].1.contains("rank 2 died") && fired[1].1.contains("rank 0 lost it"));

        // Everyone says goodbye: nothing fires.
        let (tx, rx) = mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        ranks(3, move |rv| {
            let mut rv = rv.unwrap();
            let tx = tx.lock().unwrap().clone();
            let watch = Watch::start(&mut rv, move |m| tx.send(m).unwrap()).unwrap();
            watch.goodbye();
            std::thread::sleep(Duration::from_millis(200));
        });
        assert_eq!(rx.try_iter().count(), 0);
    }
}
