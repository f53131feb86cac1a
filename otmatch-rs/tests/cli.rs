//! The `otmatch` binary end to end: files in, files out, exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

use otmatch::npy;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_otmatch"))
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("otmatch-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn topk_then_assign() {
    let dir = tempdir("ok");
    let (q, p) = (dir.join("q.npy"), dir.join("p.npy"));
    // Queries 0 and 1 both point at pool row 2, query 2 at pool row 0.
    npy::write(&q, &[3, 2], &[1.0f32, 1.0, 0.9, 1.0, 1.0, -1.0]).unwrap();
    npy::write(&p, &[4, 2], &[1.0f32, -1.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0]).unwrap();
    let (i, sc) = (dir.join("i.npy"), dir.join("s.npy"));
    let st = bin()
        .args([
            "topk",
            "--queries",
            s(&q),
            "--pool",
            s(&p),
            "-k",
            "2",
            "--out-indices",
            s(&i),
            "--out-scores",
            s(&sc),
            "--threads",
            "2",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let (shape, idx) = npy::read::<i64>(&i).unwrap();
    assert_eq!(shape, vec![3, 2]);
    assert_eq!(idx, vec![2, 1, 2, 1, 0, 2]);
    let (_, scores) = npy::read::<f32>(&sc).unwrap();
    assert_eq!(scores[0], 2.0);

    let own = dir.join("own.npy");
    npy::write(&own, &[3], &[0i64, 1, 2]).unwrap();
    let (a, stats) = (dir.join("a.npy"), dir.join("stats.json"));
    let st = bin()
        .args([
            "assign",
            "--candidates",
            s(&i),
            "--scores",
            s(&sc),
            "--own",
            s(&own),
            "--method",
            "capacity",
            "--capacity",
            "1",
            "--fallback",
            "unassigned",
            "--out",
            s(&a),
            "--stats",
            s(&stats),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let (_, caps) = npy::read::<i64>(&a).unwrap();
    // Query 0 (2.0) takes row 2; query 1 (1.9 on row 2) moves to row 1; query 2 takes 0.
    assert_eq!(caps, vec![2, 1, 0]);
    let json = std::fs::read_to_string(&stats).unwrap();
    assert!(
        json.contains("\"changed\": 2") && json.contains("\"max_load\": 1"),
        "{json}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_exits_2_with_a_message_and_writes_nothing() {
    let dir = tempdir("bad");
    let (q, p) = (dir.join("q.npy"), dir.join("p.npy"));
    npy::write(&q, &[1, 2], &[1.0f32, f32::NAN]).unwrap();
    npy::write(&p, &[1, 3], &[1.0f32, 0.0, 0.0]).unwrap();
    let out = dir.join("i.npy");
    let out_scores = dir.join("s.npy");
    let run = |args: &[&str]| {
        let o = bin().args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "topk",
        "--queries",
        s(&q),
        "--pool",
        s(&p),
        "-k",
        "1",
        "--out-indices",
        s(&out),
        "--out-scores",
        s(&out_scores),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("queries have d = 2 columns but pool has d = 3"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let (code, err) = run(&[
        "topk",
        "--queries",
        s(&q),
        "--pool",
        s(&q),
        "-k",
        "1",
        "--out-indices",
        s(&out),
        "--out-scores",
        s(&out_scores),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("NaN or infinity"), "{err}");
    let (code, err) = run(&[
        "topk",
        "--queries",
        s(&dir.join("missing.npy")),
        "--pool",
        s(&p),
        "-k",
        "1",
        "--out-indices",
        s(&out),
        "--out-scores",
        s(&out_scores),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("missing.npy"), "{err}");
    let (code, err) = run(&[
        "assign",
        "--candidates",
        s(&q),
        "--scores",
        s(&q),
        "--out",
        s(&out),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected int64"), "{err}");
    let (code, _) = run(&["assign", "--bogus"]);
    assert_eq!(code, Some(2));
    assert!(!out.exists() && !out_scores.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn run_cli(args: &[&str]) -> (Option<i32>, String) {
    let o = bin().args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn outputs_are_written_all_or_none() {
    let dir = tempdir("allornone");
    let (q, p) = (dir.join("q.npy"), dir.join("p.npy"));
    npy::write(&q, &[2, 2], &[1.0f32, 0.0, 0.0, 1.0]).unwrap();
    npy::write(&p, &[3, 2], &[1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap();
    let (i, sc) = (dir.join("i.npy"), dir.join("s.npy"));
    let topk = |oi: &Path, os: &Path| {
        run_cli(&[
            "topk",
            "--queries",
            s(&q),
            "--pool",
            s(&p),
            "-k",
            "2",
            "--out-indices",
            s(oi),
            "--out-scores",
            s(os),
        ])
    };
    // The same file twice: refused (the scores used to replace the indices, exit 0).
    let (code, err) = topk(&i, &i);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--out-indices and --out-scores both name"),
        "{err}"
    );
    let (code, err) = topk(&i, &dir.join(".").join("i.npy"));
    assert_eq!(code, Some(2), "{err}");
    // Scores cannot be written: no indices left behind either.
    let (code, err) = topk(&i, &dir.join("no-such-folder").join("s.npy"));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--out-scores") && err.contains("does not exist"),
        "{err}"
    );
    let (code, err) = topk(&i, &dir);
    assert_eq!(code, Some(2));
    assert!(err.contains("is a directory"), "{err}");
    assert_eq!(entries(&dir), ["p.npy", "q.npy"]);
    assert_eq!(topk(&i, &sc).0, Some(0));
    // assign: no assignment left behind when --stats cannot be written.
    let a = dir.join("a.npy");
    let (code, err) = run_cli(&[
        "assign",
        "--candidates",
        s(&i),
        "--scores",
        s(&sc),
        "--out",
        s(&a),
        "--stats",
        s(&dir.join("nope").join("stats.json")),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--stats") && err.contains("does not exist"),
        "{err}"
    );
    let (code, err) = run_cli(&[
        "assign",
        "--candidates",
        s(&i),
        "--scores",
        s(&sc),
        "--out",
        s(&a),
        "--stats",
        s(&a),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--out and --stats both name"), "{err}");
    assert_eq!(entries(&dir), ["i.npy", "p.npy", "q.npy", "s.npy"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn thread_counts_are_bounded() {
    let dir = tempdir("threads");
    let (q, p) = (dir.join("q.npy"), dir.join("p.npy"));
    npy::write(&q, &[1, 2], &[1.0f32, 0.0]).unwrap();
    npy::write(&p, &[2, 2], &[1.0f32, 0.0, 0.0, 1.0]).unwrap();
    let (i, sc) = (dir.join("i.npy"), dir.join("s.npy"));
    let (code, err) = run_cli(&[
        "topk",
        "--queries",
        s(&q),
        "--pool",
        s(&p),
        "-k",
        "1",
        "--out-indices",
        s(&i),
        "--out-scores",
        s(&sc),
        "--threads",
        "3000",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--threads must be at most"), "{err}");
    assert!(err.contains("got 3000"), "{err}");
    assert_eq!(entries(&dir), ["p.npy", "q.npy"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
