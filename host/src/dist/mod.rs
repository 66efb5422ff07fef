//! Multi-process training: who this process is (world.rs: torchrun/Slurm environment), how the
//! ranks meet (rendezvous.rs: a small TCP store, then a mesh of connections), the CPU collective
//! over those connections (loopback.rs: tests and laptops; multi-GPU uses NCCL, gpu/nccl.rs),
//! `pith launch` (launch.rs), a watchdog for stuck NCCL collectives (watchdog.rs) and a watch
//! that ends every rank at once when one dies (peers.rs). The trainer calls `ProcessGroup::init()` once.

pub mod launch;
pub mod loopback;
pub mod peers;
pub mod rendezvous;
pub mod watchdog;
pub mod world;

pub use loopback::{Elem, Loopback};
pub use rendezvous::Rendezvous;
pub use world::World;

use std::collections::HashMap;
use std::time::Duration;

/// The job as the trainer sees it: this rank and the collective to the others.
pub struct ProcessGroup {
    pub world: World,
    pub comm: Loopback,
}

impl ProcessGroup {
    /// From the environment; `None` when this process is the only rank (nothing to connect).
    pub fn init() -> Result<Option<ProcessGroup>, String> {
        ProcessGroup::init_from(&env_map())
    }

    pub fn init_from(env: &HashMap<String, String>) -> Result<Option<ProcessGroup>, String> {
        let world = World::from_env_map(env)?;
        if world.size == 1 {
            return Ok(None);
        }
        let mut rv = Rendezvous::join(&world, timeout(env)?)?;
        peers::install(peers::Watch::start(&mut rv, |m| {
            eprintln!("error: {m}");
            std::process::exit(1)
        })?);
        Ok(Some(ProcessGroup { world, comm: Loopback::new(rv) }))
    }

    /// Every rank, the group of a world-wide collective.
    pub fn all(&self) -> Vec<u32> {
        (0..self.world.size).collect()
    }
}

/// How long any blocking step waits for a peer: PITH_DIST_TIMEOUT seconds, default 60.
pub fn timeout(env: &HashMap<String, String>) -> Result<Duration, String> {
    seconds("PITH_DIST_TIMEOUT", env.get("PITH_DIST_TIMEOUT").map(String::as_str), 60)
}

/// The environment variable `name` = `value` as a duration in seconds (> 0), `default` unset.
pub fn seconds(name: &str, value: Option<&str>, default: u64) -> Result<Duration, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(Duration::from_secs(default)),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or(format!("{name}={v}: must be a number of seconds > 0")),
    }
}

/// The data-parallel and expert-parallel groups of `rank` when `size` ranks are split into
/// expert-parallel groups of `ep` consecutive ranks: size 4, ep 2 → ep {0,1} {2,3}, dp {0,2} {1,3}.
pub fn dp_ep_groups(rank: u32, size: u32, ep: u32) -> Result<(Vec<u32>, Vec<u32>), String> {
    if ep == 0 || !size.is_multiple_of(ep) {
        return Err(format!("expert parallel size {ep} must divide the world size {size}"));
    }
    let first = rank / ep * ep;
    Ok(((rank % ep..size).step_by(ep as usize).collect(), (first..first + ep).collect()))
}

fn env_map() -> HashMap<String, String> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
}

/// `60`, `0.5`: seconds as a person writes them.
fn secs(d: Duration) -> String {
    format!("{}", (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_and_groups() {
        let env = |v: &str| HashMap::from([("PITH_DIST_TIMEOUT".to_string(), v.to_string())]);
        assert_eq!(timeout(&HashMap::new()).unwrap(), Duration::from_secs(60));
        assert_eq!(timeout(&env("2.5")).unwrap(), Duration::from_millis(2500));
        assert_eq!(timeout(&env("0")).unwrap_err(), "PITH_DIST_TIMEOUT=0: must be a number of seconds > 0");
        assert_eq!(dp_ep_groups(3, 4, 2).unwrap(), (vec![1, 3], vec![2, 3]));
        assert_eq!(dp_ep_groups(0, 4, 4).unwrap(), (vec![0], vec![0, 1, 2, 3]));
        assert!(dp_ep_groups(0, 4, 3).is_err());
        // One rank: nothing to join.
        assert!(ProcessGroup::init_from(&HashMap::new()).unwrap().is_none());
    }

    #[test]
    fn init_from_the_environment_joins_the_ranks() {
        let port = rendezvous::tests::free_port().to_string();
        let threads: Vec<_> = (0..2)
            .map(|r: u32| {
                let vars = [("RANK", r.to_string()), ("WORLD_SIZE", "2".into()), ("MASTER_PORT", port.clone())];
                let env: HashMap<String, String> = vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                std::thread::spawn(move || {
                    let mut pg = ProcessGroup::init_from(&env).unwrap().unwrap();
                    let id = pg.comm.rendezvous().broadcast((r == 0).then_some(&[7u8; 128][..])).unwrap();
                    let mut x = [r as f32 + 1.0];
                    pg.comm.all_reduce_sum(&pg.all(), &mut x).unwrap();
                    (pg.world.rank, id, x[0])
                })
            })
            .collect();
        for (r, t) in threads.into_iter().enumerate() {
            assert_eq!(t.join().unwrap(), (r as u32, vec![7u8; 128], 3.0));
        }
    }
}
