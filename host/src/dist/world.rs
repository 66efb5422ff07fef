//! Who this process is in a multi-process job, read from the environment: torchrun's
//! RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, else Slurm's SLURM_PROCID/SLURM_NTASKS/
//! SLURM_LOCALID with the first host of SLURM_NODELIST as master, else a single rank.

use std::collections::HashMap;

/// This process's place in the job; rank 0 hosts the rendezvous at `master_addr:master_port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: u32,
    pub size: u32,
    pub local_rank: u32,
    pub master_addr: String,
    pub master_port: u16,
    /// Equal on every rank of one job, different between jobs (PITH_JOB_ID, TORCHELASTIC_RUN_ID or
    /// SLURM_JOB_ID): the rendezvous refuses a rank of another job that reached the same port.
    pub job: String,
}

impl World {
    /// Rank 0 of 1.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            job: String::new(),
        }
    }

    pub fn from_env() -> Result<World, String> {
        World::from_env_map(&super::env_map())
    }

    /// Torchrun's variables win over Slurm's; MASTER_ADDR/MASTER_PORT override Slurm's defaults
    /// (the first host of SLURM_NODELIST, port 20000 + SLURM_JOB_ID % 10000). LOCAL_RANK defaults
    /// to RANK, MASTER_ADDR to 127.0.0.1, MASTER_PORT to 29500.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<World, String> {
        let get = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let num = |k: &str| -> Result<Option<u32>, String> {
            get(k).map(|v| v.parse().map_err(|_| format!("{k}={v}: must be a whole number (0, 1, 2, ...)"))).transpose()
        };
        let job = ["PITH_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"].iter().find_map(|k| get(k)).unwrap_or("");
        let (rank, size, local, names, default_addr, default_port) =
            if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
                let need = |k: &str| num(k)?.ok_or(format!("RANK and WORLD_SIZE must be set together; {k} is missing"));
                let rank = need("RANK")?;
                let names = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];
                (rank, need("WORLD_SIZE")?, num("LOCAL_RANK")?.unwrap_or(rank), names, None, 29500)
            } else if let (Some(rank), Some(size)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                let list = get("SLURM_NODELIST").or(get("SLURM_JOB_NODELIST"));
                let host = match list {
                    Some(l) => Some(hostlist(l).map_err(|e| format!("SLURM_NODELIST={l}: {e}"))?.swap_remove(0)),
                    None => None,
                };
                let port = match get("SLURM_JOB_ID") {
                    Some(id) => {
                        20000 + id.parse::<u64>().map_err(|_| format!("SLURM_JOB_ID={id}: must be a number"))? % 10000
                    }
                    None => 29500,
                };
                (
                    rank,
                    size,
                    num("SLURM_LOCALID")?.unwrap_or(0),
                    ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
                    host,
                    port as u16,
                )
            } else {
                return Ok(World { job: job.into(), ..World::single() });
            };
        let [rk, sz, lk] = names;
        if size == 0 {
            return Err(format!("{sz}=0: must be at least 1"));
        }
        if rank >= size {
            return Err(format!("{rk}={rank} but {sz}={size}: {rk} must be in 0..{size}"));
        }
        if local >= size {
            return Err(format!("{lk}={local} but {sz}={size}: {lk} must be in 0..{size}"));
        }
        let master_addr = match (get("MASTER_ADDR"), default_addr) {
            (Some(a), _) => a.to_string(),
            (None, Some(h)) => h,
            (None, None) if rk == "RANK" => "127.0.0.1".into(),
            (None, None) => return Err("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_NODELIST".into()),
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => {
                p.parse().ok().filter(|&p| p > 0).ok_or(format!("MASTER_PORT={p}: must be a port in 1..=65535"))?
            }
            None => default_port,
        };
        // torchrun's agent already listens on MASTER_PORT (its TCPStore, which PyTorch workers
        // share): Pith's rendezvous takes the next port.
        let master_port = match get("TORCHELASTIC_USE_AGENT_STORE") {
            Some(v) if v.eq_ignore_ascii_case("true") => master_port
                .checked_add(1)
                .ok_or("MASTER_PORT=65535 under torchrun: Pith needs MASTER_PORT + 1 too; pick a lower port")?,
            _ => master_port,
        };
        Ok(World { rank, size, local_rank: local, master_addr, master_port, job: job.into() })
    }
}

/// Expand Slurm's compressed host list: `node[01-03,07],gpu2` → node01 node02 node03 node07 gpu2
/// (zero padding kept; several brackets in one name multiply: `r[1-2]n[1-2]`).
pub fn hostlist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in list.char_indices().chain([(list.len(), ',')]) {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                hosts.extend(expand(&list[start..i])?);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("`{list}` has unbalanced brackets"));
    }
    Ok(hosts)
}

fn expand(name: &str) -> Result<Vec<String>, String> {
    let Some(open) = name.find('[') else {
        return if name.is_empty() || name.contains(']') {
            Err(format!("bad host name `{name}`"))
        } else {
            Ok(vec![name.into()])
        };
    };
    let close = open + name[open..].find(']').ok_or(format!("`{name}` has an unclosed ["))?;
    let (prefix, tail) = (&name[..open], &name[close + 1..]);
    let rest = if tail.is_empty() { vec![String::new()] } else { expand(tail)? };
    let mut out = Vec::new();
    for range in name[open + 1..close].split(',') {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let bad = || format!("bad range `{range}` in `{name}` (valid: 3, 01-04)");
        let (lo, hi): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if lo > hi {
            return Err(bad());
        }
        for n in lo..=hi {
            out.extend(rest.iter().map(|r| format!("{prefix}{n:0w$}{r}", w = a.len())));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(vars: &[(&str, &str)]) -> Result<World, String> {
        World::from_env_map(&vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn torchrun_slurm_and_single() {
        assert_eq!(world(&[]).unwrap(), World::single());
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "1234"),
        ]);
        let want =
            World { rank: 3, size: 8, local_rank: 1, master_addr: "n0".into(), master_port: 1234, job: "".into() };
        assert_eq!(w.unwrap(), want);
        let agent = world(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]);
        assert_eq!(agent.unwrap().master_port, 29501, "torchrun's agent holds MASTER_PORT");
        let slurm = [("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_ID", "123456")];
        let mut vars = slurm.to_vec();
        vars.push(("SLURM_NODELIST", "gpu[07-08],cpu1"));
        let w = world(&vars).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.master_addr.as_str(), w.master_port), (5, 8, 1, "gpu07", 23456));
        assert_eq!(w.job, "123456");
        vars.extend([("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "999")]);
        let w = world(&vars).unwrap();
        assert_eq!((w.master_addr.as_str(), w.master_port), ("10.0.0.1", 999));
        vars.extend([("RANK", "0"), ("WORLD_SIZE", "2")]); // torchrun wins
        let w = world(&vars).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (0, 2, 0));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = |vars: &[(&str, &str)]| world(vars).unwrap_err();
        assert_eq!(err(&[("RANK", "3"), ("WORLD_SIZE", "2")]), "RANK=3 but WORLD_SIZE=2: RANK must be in 0..2");
        assert_eq!(err(&[("RANK", "0"), ("WORLD_SIZE", "0")]), "WORLD_SIZE=0: must be at least 1");
        assert_eq!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]), "RANK=x: must be a whole number (0, 1, 2, ...)");
        assert_eq!(err(&[("WORLD_SIZE", "2")]), "RANK and WORLD_SIZE must be set together; RANK is missing");
        let port = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")]);
        assert_eq!(port, "MASTER_PORT=70000: must be a port in 1..=65535");
        let slurm = err(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2"), ("SLURM_NODELIST", "a")]);
        assert_eq!(slurm, "SLURM_PROCID=2 but SLURM_NTASKS=2: SLURM_PROCID must be in 0..2");
        let list = err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_NODELIST", "n[3-1]")]);
        assert_eq!(list, "SLURM_NODELIST=n[3-1]: bad range `3-1` in `n[3-1]` (valid: 3, 01-04)");
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(
            hostlist("node[01-04,07],gpu2").unwrap(),
            ["node01", "node02", "node03", "node04", "node07", "gpu2"]
        );
        assert_eq!(hostlist("r[1-2]n[8-9]").unwrap(), ["r1n8", "r1n9", "r2n8", "r2n9"]);
        assert_eq!(hostlist("a,b-ib[9-10]").unwrap(), ["a", "b-ib9", "b-ib10"]);
        for bad in ["node[01-", "n[a]", "a,,b", "n]"] {
            assert!(hostlist(bad).is_err(), "{bad}");
        }
    }
}
