//! What two processes, a full disk, a read-only directory or a signal do to a pack, through
//! the real binary: one writer at a time, a failed write that leaves the last checkpoint
//! valid, Ctrl-C that checkpoints mid-epoch, and every case resuming to the weights of a run
//! that was never disturbed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

fn adapt_args(pack: &Path, task: &str) -> Vec<String> {
    method_args("finetune", pack, task)
}

fn method_args(method: &str, pack: &Path, task: &str) -> Vec<String> {
    ["adapt", "--method", method, "--task", task, "-o", p(pack), "--quiet"].map(String::from).to_vec()
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mtpack"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mtpack starts")
}

fn finish(child: Child) -> Run {
    child.wait_with_output().expect("wait").into()
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn progress(pack: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(pack.join("checkpoint/progress.json")).ok()?).ok()
}

fn epochs_done(pack: &Path) -> u64 {
    progress(pack).and_then(|v| v["epochs_done"].as_u64()).unwrap_or(0)
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) with a pid we started and have not waited for yet.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// A pack that no signal or failure touched, for comparison.
fn undisturbed(dir: &Path, task: &str) -> PathBuf {
    let whole = dir.join("whole");
    mtpack(adapt_args(&whole, task)).expect(0);
    whole
}

fn assert_same_pack(resumed: &Path, whole: &Path) {
    assert_eq!(weights(&resumed.join("model.onnx")), weights(&whole.join("model.onnx")));
    assert_eq!(manifest(resumed)["accuracy_matrix"], manifest(whole)["accuracy_matrix"]);
    assert!(!resumed.join("checkpoint/progress.json").exists(), "a finished task leaves no checkpoint");
}

#[test]
fn a_second_writer_is_refused_naming_the_first_and_readers_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let first = spawn(&adapt_args(&pack, &digits_task("a", ":epochs=40:batch=8")));
    wait_until("the first run has a checkpoint", || epochs_done(&pack) >= 1);
    // A different plan into the same directory: refused at once, the holder named.
    let second = mtpack(adapt_args(&pack, &digits_task("b", ":epochs=1"))).expect(2);
    assert!(second.stderr.contains("is in use"), "{}", second.stderr);
    assert!(second.stderr.contains(&format!("process {}", first.id())), "{}", second.stderr);
    assert!(second.stderr.contains("--wait"), "{}", second.stderr);
    // A reader is refused too while the pack is being written.
    let artifact = dir.path().join("a.onnx");
    let export = mtpack(["export", p(&pack), "-o", p(&artifact)]).expect(2);
    assert!(export.stderr.contains("is in use"), "{}", export.stderr);
    assert!(!artifact.exists());
    // `report` reads only the manifest, replaced atomically: it needs no lock.
    let html = dir.path().join("r.html");
    mtpack(["report", p(&pack), "-o", p(&html), "--quiet"]).expect(0);
    // With --wait the reader blocks until the writer is done, then exports its result.
    let reader = spawn(&["export", p(&pack), "-o", p(&artifact), "--wait"].map(String::from));
    let writer = finish(first).expect(0);
    assert!(writer.stderr.is_empty(), "{}", writer.stderr);
    finish(reader).expect(0);
    assert!(artifact.is_file());
}

#[test]
fn a_waiting_writer_runs_after_the_first_and_a_killed_holder_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let args = adapt_args(&pack, &digits_task("a", ":epochs=30:batch=8"));
    let first = spawn(&args);
    wait_until("the first run has a checkpoint", || epochs_done(&pack) >= 1);
    let mut waiting = args.clone();
    waiting.push("--wait".into());
    let second = spawn(&waiting);
    finish(first).expect(0);
    // The same command after the first finished: the pack is complete, nothing to do.
    let second = finish(second).expect(0);
    assert!(second.stdout.contains("a"), "{}", second.stdout);
    // SIGKILL releases the lock with the process.
    let third = adapt_args(&pack, &digits_task("b", ":epochs=1"));
    let mut extend = vec!["adapt".to_string(), "--resume".into(), p(&pack).into()];
    extend.extend(["--task".into(), digits_task("b", ":epochs=40:batch=8"), "--quiet".into()]);
    let mut killed = spawn(&extend);
    wait_until("the extension has a checkpoint", || epochs_done(&pack) >= 1);
    killed.kill().unwrap();
    killed.wait().unwrap();
    let refused = mtpack(third).expect(2);
    assert!(refused.stderr.contains("different plan"), "the lock must be free again: {}", refused.stderr);
}

#[test]
fn ctrl_c_checkpoints_mid_epoch_and_the_rerun_matches_an_undisturbed_run() {
    let dir = tempfile::tempdir().unwrap();
    let task = digits_task("d", ":epochs=6:batch=8:lr=0.005");
    let pack = dir.path().join("stopped");
    let child = spawn(&adapt_args(&pack, &task));
    wait_until("two epochs are done", || epochs_done(&pack) >= 2);
    signal(&child, libc::SIGINT);
    let stopped = finish(child);
    assert_eq!(stopped.code, 130, "{}", stopped.stderr);
    assert!(stopped.stderr.contains("interrupted in task 'd'"), "{}", stopped.stderr);
    assert!(stopped.stderr.contains("rerun the same command to resume"), "{}", stopped.stderr);
    let at = progress(&pack).expect("a checkpoint");
    assert!(at["epochs_done"].as_u64().unwrap() < 6, "the run must have been stopped: {at}");
    // Almost always mid-epoch (one step in ~180 ends an epoch); then the epoch's part is kept.
    let mid_epoch = stopped.stderr.contains(", step ");
    assert_eq!(at["partial"].is_object(), mid_epoch, "{at}");
    assert_eq!(manifest(&pack)["tasks"][0]["done"], false);
    mtpack(adapt_args(&pack, &task)).expect(0);
    assert_same_pack(&pack, &undisturbed(dir.path(), &task));
}

#[test]
fn sigterm_then_a_second_signal_stops_at_once_and_the_pack_still_resumes() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    // Steps of a real backbone take long enough (tenths of a second) for the second signal
    // to arrive while the first one's step and checkpoint are still under way.
    let mnv2 = fetched("models/mobilenetv2_imagenet.onnx");
    let task = format!("a={}:classes=0,1,2:train_per_class=8:resize=64x64:channels=3:epochs=3:batch=4", p(&digits()));
    let args = |pack: &Path| {
        let mut a = adapt_args(pack, &task);
        a.insert(1, p(&mnv2).to_string());
        a
    };
    let pack = dir.path().join("stopped");
    let mut child = spawn(&args(&pack));
    wait_until("an epoch is done", || epochs_done(&pack) >= 1);
    signal(&child, libc::SIGTERM);
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    while !seen.contains("stopping") {
        assert!(stderr.read_line(&mut seen).unwrap() > 0, "no acknowledgement of the first signal: {seen}");
    }
    signal(&child, libc::SIGTERM);
    stderr.read_to_string(&mut seen).unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "{seen}");
    assert!(seen.contains("stopped at once"), "{seen}");
    mtpack(args(&pack)).expect(0);
    let whole = dir.path().join("whole");
    mtpack(args(&whole)).expect(0);
    assert_same_pack(&pack, &whole);
}

fn failing(env_value: &str, args: &[String]) -> Run {
    let cmd =
        Command::new(env!("CARGO_BIN_EXE_mtpack")).args(args).env(mtpack::fsutil::FAIL_WRITE_ENV, env_value).output();
    cmd.expect("mtpack runs").into()
}

fn temporaries(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for sub in ["", "checkpoint", "state"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            found.extend(
                rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".tmp")),
            );
        }
    }
    found
}

#[test]
fn a_full_disk_mid_task_names_the_file_keeps_the_last_checkpoint_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let task = digits_task("d", ":epochs=4:lr=0.005");
    let pack = dir.path().join("full");
    let args = adapt_args(&pack, &task);
    let r = failing("checkpoint/weights_e3", &args).expect(2);
    assert!(r.stderr.contains("weights_e3.safetensors"), "{}", r.stderr);
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert_eq!(epochs_done(&pack), 2, "the checkpoint of epoch 2 stays the valid one");
    assert!(pack.join("checkpoint/weights_e2.safetensors").is_file());
    assert_eq!(temporaries(&pack), Vec::<String>::new());
    mtpack(&args).expect(0);
    assert_same_pack(&pack, &undisturbed(dir.path(), &task));
}

#[test]
fn a_read_only_directory_at_the_end_of_a_task_resumes_to_the_same_pack() {
    let dir = tempfile::tempdir().unwrap();
    let task = digits_task("d", ":epochs=2:lr=0.005");
    let pack = dir.path().join("readonly");
    let args = method_args("ewc", &pack, &task);
    // The task's method state is written after its weights and before the manifest.
    let r = failing("state/after_d/:readonly", &args);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("state/after_d/"), "{}", r.stderr);
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);
    assert_eq!(manifest(&pack)["tasks"][0]["done"], false);
    mtpack(&args).expect(0);
    let whole = dir.path().join("whole");
    mtpack(method_args("ewc", &whole, &task)).expect(0);
    assert_same_pack(&pack, &whole);
    assert_eq!(temporaries(&pack), Vec::<String>::new());
}

#[test]
fn every_method_stopped_mid_epoch_in_its_second_task_resumes_to_the_same_pack() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = [
        digits_task("a", ":classes=0,1,2,3,4:epochs=3:batch=8"),
        digits_task("b", ":classes=5,6,7,8,9:epochs=3:batch=8"),
    ];
    for method in ["lwf", "ewc", "joint", "packnet", "piggyback"] {
        let args = |pack: &Path| {
            let mut a = method_args(method, pack, &tasks[0]);
            a.extend(["--task".to_string(), tasks[1].clone()]);
            a
        };
        let stopped = dir.path().join(format!("{method}-stopped"));
        let child = spawn(&args(&stopped));
        let in_b = || progress(&stopped).is_some_and(|v| v["task"] == "b" && v["epochs_done"].as_u64() >= Some(1));
        wait_until("an epoch of the second task is done", in_b);
        signal(&child, libc::SIGINT);
        let r = finish(child);
        assert_eq!(r.code, 130, "{method}: {}", r.stderr);
        assert!(r.stderr.contains("interrupted in task 'b'"), "{method}: {}", r.stderr);
        mtpack(args(&stopped)).expect(0);
        let whole = dir.path().join(format!("{method}-whole"));
        mtpack(args(&whole)).expect(0);
        assert_same_pack(&stopped, &whole);
    }
}
