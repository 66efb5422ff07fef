//! `pith launch --gpus N CFG [train flags…]`: N ranks of `pith train` on this machine, each with
//! torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT; a
//! rank picks its GPU by LOCAL_RANK among CUDA_VISIBLE_DEVICES, which is left as it is). Their
//! output is forwarded line by line, `[rank r] ` before every line but rank 0's. When a rank fails
//! the others get SIGTERM, then SIGKILL after a grace period, and launch exits with that rank's code.
//! SIGINT/SIGTERM to launch are passed to every rank; each rank runs in its own process group, so
//! a terminal's Ctrl-C reaches it once (the trainer stops after a checkpoint at the first signal
//! and at once at the second), and it gets SIGTERM if launch itself dies.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub struct LaunchOpts {
    pub ranks: u32,
    /// MASTER_PORT; None: a port free at launch.
    pub port: Option<u16>,
    /// How long a rank has between SIGTERM and SIGKILL once another failed.
    pub grace: Duration,
}

/// The environment of rank `rank` of `ranks` (besides NCCL_NVLS_ENABLE=0 when unset).
pub fn child_env(rank: u32, ranks: u32, port: u16, job: &str) -> Vec<(&'static str, String)> {
    let (rank, ranks) = (rank.to_string(), ranks.to_string());
    vec![
        ("RANK", rank.clone()),
        ("WORLD_SIZE", ranks.clone()),
        ("LOCAL_RANK", rank),
        ("LOCAL_WORLD_SIZE", ranks),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("PITH_JOB_ID", job.into()),
    ]
}

/// One line of rank `rank`'s output as launch prints it.
pub fn prefixed(rank: u32, line: &[u8]) -> Vec<u8> {
    let mut out = if rank == 0 { vec![] } else { format!("[rank {rank}] ").into_bytes() };
    out.extend_from_slice(line);
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

/// A shell's view of how a process ended: its code, or 128 + the signal that killed it.
pub fn exit_code(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn describe(st: ExitStatus) -> String {
    match st.code() {
        Some(c) => format!("exited with code {c}"),
        None => format!("was killed by signal {}", st.signal().unwrap_or(0)),
    }
}

/// SIGINT and SIGTERM recorded (the latest signal's number) instead of ending launch.
pub fn signals() -> Result<Arc<AtomicUsize>, String> {
    let stop = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, stop.clone(), sig as usize)
            .map_err(|e| format!("installing the handler of signal {sig}: {e}"))?;
    }
    Ok(stop)
}

/// Run `program args…` as every rank and watch them; a signal number stored in `stop` is sent
/// to every rank. Returns launch's exit code: 0, or the first failed rank's.
pub fn launch(program: &Path, args: &[OsString], opts: &LaunchOpts, stop: &AtomicUsize) -> Result<i32, String> {
    if opts.ranks == 0 {
        return Err("--gpus 0: valid: 1 or more".into());
    }
    let port = match opts.port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port for MASTER_PORT: {e}"))?
            .port(),
    };
    let job = format!("launch-{}-{port}", std::process::id());
    let (done_tx, done_rx) = mpsc::channel();
    let mut kids: Vec<Child> = Vec::new();
    for r in 0..opts.ranks {
        let mut c = Command::new(program);
        c.args(args).envs(child_env(r, opts.ranks, port, &job)).stdin(Stdio::null());
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            c.env("NCCL_NVLS_ENABLE", "0");
        }
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            })
        };
        match c.spawn() {
            Ok(mut k) => {
                forward(k.stdout.take().unwrap(), r, false, done_tx.clone());
                forward(k.stderr.take().unwrap(), r, true, done_tx.clone());
                kids.push(k);
            }
            Err(e) => {
                kids.iter_mut().for_each(|k| drop(k.kill().and_then(|_| k.wait())));
                return Err(format!("starting rank {r} ({}): {e}", program.display()));
            }
        }
    }
    let mut ended: Vec<Option<ExitStatus>> = vec![None; kids.len()];
    let mut failed: Option<ExitStatus> = None;
    let (mut kill_at, mut interrupted) = (None, false);
    let signal = |kids: &[Child], ended: &[Option<ExitStatus>], sig: i32| {
        for (k, _) in kids.iter().zip(ended).filter(|(_, e)| e.is_none()) {
            unsafe { libc::kill(-(k.id() as i32), sig) };
        }
    };
    while ended.iter().any(Option::is_none) {
        for r in 0..kids.len() {
            if ended[r].is_some() {
                continue;
            }
            let Some(st) = kids[r].try_wait().map_err(|e| format!("waiting for rank {r}: {e}"))? else { continue };
            ended[r] = Some(st);
            if !st.success() && failed.is_none() && !interrupted {
                failed = Some(st);
                let rest = if ended.iter().any(Option::is_none) { "; stopping the other ranks" } else { "" };
                eprintln!("error: rank {r} {}{rest}", describe(st));
                signal(&kids, &ended, libc::SIGTERM);
                kill_at = Some(Instant::now() + opts.grace);
            }
        }
        let sig = stop.swap(0, Ordering::SeqCst);
        if sig != 0 {
            interrupted = true;
            signal(&kids, &ended, sig as i32);
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            signal(&kids, &ended, libc::SIGKILL);
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The last lines: the pipes close when the ranks (and anything they started) are gone.
    drop(done_tx);
    let end = Instant::now() + Duration::from_secs(2);
    while done_rx.recv_timeout(end.saturating_duration_since(Instant::now())).is_ok() {}
    let first_bad = ended.iter().flatten().find(|s| !s.success());
    Ok(failed.or(first_bad.copied()).map_or(0, exit_code))
}

/// Copy a rank's stdout or stderr to launch's, a whole line at a time.
fn forward(pipe: impl Read + Send + 'static, rank: u32, stderr: bool, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let (mut pipe, mut line) = (BufReader::new(pipe), Vec::new());
        while pipe.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let out = prefixed(rank, &line);
            let _ = if stderr {
                std::io::stderr().lock().write_all(&out)
            } else {
                std::io::stdout().lock().write_all(&out)
            };
            line.clear();
        }
        drop(done);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, ranks: u32, grace_ms: u64, stop: &AtomicUsize) -> (i32, Duration) {
        let t = Instant::now();
        let opts = LaunchOpts { ranks, port: None, grace: Duration::from_millis(grace_ms) };
        let code = launch(Path::new("sh"), &["-c".into(), script.into()], &opts, stop).unwrap();
        (code, t.elapsed())
    }

    #[test]
    fn env_prefixes_and_codes() {
        let env = child_env(1, 2, 29501, "j");
        assert!(env.contains(&("RANK", "1".into())) && env.contains(&("WORLD_SIZE", "2".into())));
        assert!(env.contains(&("LOCAL_RANK", "1".into())) && env.contains(&("MASTER_PORT", "29501".into())));
        assert_eq!(prefixed(0, b"loss 3.2\n"), b"loss 3.2\n");
        assert_eq!(prefixed(3, b"no newline"), b"[rank 3] no newline\n");
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(describe(ExitStatus::from_raw(9)), "was killed by signal 9");
        let none = LaunchOpts { ranks: 0, port: None, grace: Duration::ZERO };
        assert_eq!(
            launch(Path::new("true"), &[], &none, &AtomicUsize::new(0)).unwrap_err(),
            "--gpus 0: valid: 1 or more"
        );
    }

    #[test]
    fn every_rank_gets_its_environment() {
        let script = r#"[ "$WORLD_SIZE" = 3 ] && [ "$LOCAL_RANK" = "$RANK" ] && [ "$MASTER_ADDR" = 127.0.0.1 ] &&
            [ "$MASTER_PORT" -gt 0 ] && [ -n "$PITH_JOB_ID" ] && [ -n "$NCCL_NVLS_ENABLE" ]"#;
        assert_eq!(sh(script, 3, 100, &AtomicUsize::new(0)).0, 0);
    }

    #[test]
    fn a_failed_rank_stops_the_others_and_sets_the_code() {
        // Rank 1 fails; the others would sleep for a minute.
        let (code, took) = sh(r#"[ "$RANK" = 1 ] && exit 3; exec sleep 60"#, 3, 5000, &AtomicUsize::new(0));
        assert_eq!(code, 3);
        assert!(took < Duration::from_secs(20), "{took:?}");
        // The others ignore SIGTERM: SIGKILL after the grace period.
        let (code, took) =
            sh(r#"trap '' TERM; [ "$RANK" = 2 ] && exit 4; exec sleep 60"#, 3, 300, &AtomicUsize::new(0));
        assert_eq!(code, 4);
        assert!(took < Duration::from_secs(20), "{took:?}");
    }

    #[test]
    fn a_signal_to_launch_reaches_every_rank() {
        let stop = Arc::new(AtomicUsize::new(0));
        let s = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            s.store(libc::SIGTERM as usize, Ordering::SeqCst);
        });
        let (code, took) = sh("exec sleep 60", 2, 5000, &stop);
        assert_eq!(code, 128 + libc::SIGTERM);
        assert!(took < Duration::from_secs(20), "{took:?}");
    }
}
