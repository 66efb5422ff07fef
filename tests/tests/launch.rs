//! `pith launch`: the ranks run `pith train` with the trailing arguments; a failed rank stops the
//! job with its exit code and a line naming it; the other ranks' lines carry `[rank r] `.

use pith_tests::{pith, tmp, WORKSPACE};

#[test]
fn ranks_that_fail_end_the_launch_with_their_code_and_rank() {
    let dir = tmp("launch-bad");
    let text = std::fs::read_to_string(format!("{WORKSPACE}/configs/quickstart.toml")).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, text.replace("clip = 1.0", "clip = -1.0")).unwrap();
    let (code, so, se) = pith(&["launch", "--gpus", "2", cfg.to_str().unwrap(), "--set", "train.steps=1"]);
    assert_eq!(code, 1, "{so}{se}");
    let stopped = se.lines().filter(|l| l.starts_with("error: rank ") && l.contains(" exited with code 1")).count();
    assert_eq!(stopped, 1, "{se}");
    let bad: Vec<&str> = se.lines().filter(|l| l.contains("train.clip = -1: must be finite and >= 0")).collect();
    assert!(
        !bad.is_empty() && bad.iter().all(|l| l.starts_with("error: ") || l.starts_with("[rank 1] error: ")),
        "{se}"
    );
    // No config: the built-in quickstart, and a flag first.
    let (code, _, se) = pith(&["launch", "--gpus", "2", "--set", "train.clip=-1"]);
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("(--set train.clip=-1): train.clip = -1"), "{se}");
    let (code, _, se) = pith(&["launch", "--gpus", "0"]);
    assert_eq!((code, se.trim()), (1, "error: --gpus 0: valid: 1 or more"));
}
