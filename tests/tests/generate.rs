//! `pith generate`: greedy tokens are the argmax of the model's own logits (`eval-logits` on the
//! same sequence), sampling is reproducible from its seed, and bad options are refused.

use pith::hf::{eval_logits, generate, Sampling};
use pith::registry::Registry;
use pith_tests::{out, pith, tmp};

#[test]
fn greedy_tokens_are_the_argmax_of_the_logits_and_sampling_follows_its_seed() {
    let run = tmp("generate");
    let (code, _, se) = pith(&["train", "--set", "train.steps=20", "--set", "train.eval_every=0", "--set", &out(&run)]);
    assert_eq!(code, 0, "{se}");
    let reg = Registry::load(&[]).unwrap();
    let greedy = Sampling { max_tokens: 6, temperature: 0.0, top_k: 0, seed: 1 };
    let (_, ids) = generate(&run, "ab", &greedy, &reg).unwrap();
    assert_eq!((ids.len(), &ids[..2]), (8, &[97u32, 98][..]), "the prompt's bytes, then 6 tokens");
    let logits = eval_logits(&run, &ids, &reg).unwrap()["logits"].clone();
    for p in 2..ids.len() {
        let row: Vec<f64> = logits[p - 1].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let argmax = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap();
        assert_eq!(ids[p] as usize, argmax, "token {p}");
    }
    let sample =
        |seed| generate(&run, "ab", &Sampling { max_tokens: 12, temperature: 1.0, top_k: 8, seed }, &reg).unwrap().1;
    assert_eq!(sample(3), sample(3));
    assert_ne!(sample(3), sample(4));
    let r = run.to_str().unwrap();
    let (code, _, se) = pith(&["generate", r, "--prompt", "ab", "--temperature=-1"]);
    assert!(code == 1 && se.contains("--temperature -1: a number >= 0"), "{se}");
    let (code, _, se) = pith(&["generate", r, "--prompt", ""]);
    assert!(code == 1 && se.contains("--prompt"), "{se}");
}
