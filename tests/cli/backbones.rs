//! Backbones beyond the CNNs mtpack grew up on, through the real binary: a transformer written
//! the way PyTorch exports one (committed tiny fixture, every method, export, verify), an NHWC
//! TensorFlow-style input, weights made by nodes, `--at` with pooling, and the real ViT-S/14
//! encoder-decoder fetched by scripts/fetch.sh.

use std::path::{Path, PathBuf};

use crate::helpers::*;

const METHODS: [&str; 7] = ["finetune", "feature-extract", "joint", "lwf", "ewc", "packnet", "piggyback"];

fn tiny_vit() -> PathBuf {
    root().join("fixtures/tiny/tiny_vit.onnx")
}

fn tiny_nhwc() -> PathBuf {
    root().join("fixtures/tiny/tiny_digits_nhwc.onnx")
}

/// A small real dataset: `train` and `test` UCI digits per class of `classes`, from the
/// committed digits (keeps real-backbone tests at 224x224 to seconds).
fn small_digits(dir: &Path, classes: &[i64], train: usize, test: usize) -> PathBuf {
    let mut d = mtpack::data::Dataset::load(&digits()).unwrap();
    let pick = |s: &mtpack::data::Split, per: usize| {
        let mut idx = Vec::new();
        for &c in classes {
            idx.extend(s.y.iter().enumerate().filter(|(_, y)| **y == c).map(|(i, _)| i).take(per));
        }
        s.select(&idx)
    };
    let t = d.test.take().unwrap();
    d.train = pick(&d.train, train);
    d.test = Some(pick(&t, test));
    let out = dir.join(format!("digits_{train}_{test}.safetensors"));
    d.save(&out).unwrap();
    out
}

#[test]
fn inspect_finds_weights_made_by_nodes_and_candidate_features_of_a_transformer() {
    let j = mtpack(["inspect", "--json", p(&tiny_vit())]).expect(0).json();
    assert_eq!(schema_violation(&schema("inspect.schema.json"), &j, "$"), None);
    assert_eq!(j["engine_missing_ops"], serde_json::json!([]), "every op of the transformer trains");
    assert_eq!(j["weights_from_nodes"]["constant_of_shape"], 1);
    assert_eq!(j["weights_from_nodes"]["identities"], 1);
    // Patch conv + per block qkv, proj, fc1, fc2 (block 2's proj is block 1's, tied).
    let weights: Vec<&str> = j["trainable"].as_array().unwrap().iter().map(|l| l["weight"].as_str().unwrap()).collect();
    assert_eq!(weights.len(), 9, "{weights:?}");
    assert!(weights.iter().any(|w| w.contains("fc2_weight")), "the Constant-made weight is trainable: {weights:?}");
    let cands = j["candidates"].as_array().unwrap();
    let tokens = cands.iter().find(|c| c["tensor"] == "tokens").expect("the token output is a candidate");
    assert_eq!(tokens["shape"], serde_json::json!([1, 17, 16]));
    assert!(cands.iter().any(|c| c["op"] == "LayerNorm (decomposed)"), "{cands:?}");
    let text = mtpack(["inspect", p(&tiny_vit())]).expect(0).stdout;
    assert!(text.contains("candidates") && text.contains("[1, 17, 16]"), "{text}");
}

#[test]
fn the_engine_runs_the_transformer_as_onnx_runtime_and_tract_do() {
    let j = mtpack(["run", p(&tiny_vit()), "--input", p(&digits()), "--runtime", "all", "--json"]).expect(0).json();
    assert_eq!(j["agree"], true, "{j}");
    for c in j["comparisons"].as_array().unwrap() {
        assert!(c["max_abs_diff"].as_f64().unwrap() < 1e-4, "{c}");
    }
}

#[test]
fn every_method_adapts_a_transformer_and_its_artifact_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let settings = "optimizer=adamw:lr=0.003:epochs=2";
    let t1 = format!("low={}:classes=0,1,2,3,4:{settings}", p(&digits()));
    let t2 = format!("high={}:classes=5,6,7,8,9:{settings}", p(&digits()));
    let vit = tiny_vit();
    for method in METHODS {
        let pack = dir.path().join(method);
        let mut args = vec!["adapt", p(&vit), "--method", method, "--task", &t1, "--task", &t2];
        // Heads on the class token for half the methods, on the mean (default) for the rest.
        if ["finetune", "ewc", "packnet"].contains(&method) {
            args.extend(["--at", "tokens", "--pool", "cls"]);
        }
        args.extend(["-o", p(&pack), "--quiet", "--json"]);
        let j = mtpack(&args).expect(0).json();
        let m = manifest(&pack);
        assert_eq!(m["backbone"]["cut"]["at"], "tokens", "{method}");
        assert_eq!(m["backbone"]["cut"]["shape"], serde_json::json!([1, 17, 16]), "{method}");
        let pool = if args.contains(&"cls") { "cls" } else { "mean" };
        assert_eq!(m["backbone"]["cut"]["pool"], pool, "{method}");
        assert_eq!(schema_violation(&schema("pack.schema.json"), &m, "$"), None, "{method}");
        let rows = j["accuracy_matrix"].as_array().unwrap();
        if ["finetune", "joint", "ewc", "packnet"].contains(&method) {
            // Training the encoder (seeded random weights) learns digits 0-4 well above chance.
            let first = rows[0][0].as_f64().unwrap();
            assert!(first > 0.5, "{method}: {rows:?}");
        }
        if ["packnet", "piggyback", "feature-extract"].contains(&method) {
            assert_eq!(rows[0][0], rows[1][0], "{method}: the first task is untouched by the second");
        }
        let out = dir.path().join(format!("{method}.onnx"));
        let e = mtpack(["export", p(&pack), "-o", p(&out), "--json"]).expect(0).json();
        assert_eq!(e["verified"]["accuracy_matches_pack"], true, "{method}");
        mtpack(["verify", p(&out)]).expect(0);
    }
}

#[test]
fn cut_points_that_do_not_exist_are_refused_with_the_nearest_names() {
    let dir = tempfile::tempdir().unwrap();
    let t = format!("a={}:classes=0,1", p(&digits()));
    let pack = dir.path().join("pack");
    let r = mtpack(["adapt", p(&tiny_vit()), "--task", &t, "--at", "token", "-o", p(&pack)]).expect(2);
    assert!(r.stderr.contains("--at token") && r.stderr.contains("nearest: tokens"), "{}", r.stderr);
    assert!(!pack.join("manifest.json").exists());
}

#[test]
fn an_nhwc_backbone_takes_its_own_layout_and_exports_raw_images_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let t1 = format!("low={}:classes=0,1,2,3,4:epochs=1", p(&digits()));
    let pack = dir.path().join("pack");
    mtpack(["adapt", p(&tiny_nhwc()), "--method", "finetune", "--task", &t1, "-o", p(&pack), "--quiet"]).expect(0);
    let m = manifest(&pack);
    assert_eq!(m["tasks"][0]["preprocessing"]["layout"], "nhwc");
    let acc = m["accuracy_matrix"].as_array().unwrap().last().unwrap()[1].as_f64().unwrap();
    assert!(acc > 0.9, "the pretrained NHWC backbone learns digits 0-4: {acc}");
    let out = dir.path().join("low.onnx");
    let j =
        mtpack(["export", p(&pack), "--task", "low", "--with-preprocessing", "-o", p(&out), "--json"]).expect(0).json();
    // Raw images through the in-graph preprocessing: the pack's accuracy up to float rounding.
    assert!((j["tasks"][0]["accuracy"].as_f64().unwrap() - acc).abs() < 0.01, "{j}");
    let i = mtpack(["inspect", "--json", p(&out)]).expect(0).json();
    assert_eq!(i["inputs"][0]["shape"], serde_json::json!(["batch", 8, 8, 1]), "raw images in the backbone's layout");
    mtpack(["verify", p(&out)]).expect(0);
    // The same backbone fed NCHW by force: refused, naming the layouts.
    let forced = format!("low={}:classes=0,1:layout=nchw", p(&digits()));
    let r = mtpack(["adapt", p(&tiny_nhwc()), "--task", &forced, "-o", p(&dir.path().join("x"))]).expect(2);
    assert!(r.stderr.contains("[1, 8, 8]") && r.stderr.contains("layout"), "{}", r.stderr);
}

#[test]
fn real_vit_runs_in_the_engine_as_in_onnx_runtime_and_adapts_at_its_encoder() {
    let vit = fetched("models/vit_s14_focus.onnx");
    let dir = tempfile::tempdir().unwrap();
    let data = small_digits(dir.path(), &[0, 1], 6, 4);
    let pre = ["--resize", "224x224", "--channels", "3", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"];
    let mut run = vec!["run", p(&vit), "--input", p(&data), "--runtime", "all", "--limit", "2", "--json"];
    run.extend(pre);
    run.extend(["--tolerance", "1e-3"]);
    let j = mtpack(&run).expect(0).json();
    assert_eq!(j["agree"], true, "{j}");
    let at = "/backbone/layernorm/Add_1_output_0";
    let i = mtpack(["inspect", "--json", p(&vit)]).expect(0).json();
    let cand = i["candidates"].as_array().unwrap().iter().find(|c| c["tensor"] == at).cloned();
    assert_eq!(
        cand.map(|c| c["shape"].clone()),
        Some(serde_json::json!([1, 257, 384])),
        "the encoder output is listed"
    );
    let task = format!(
        "zero-one={}:resize=224x224:channels=3:mean=0.485,0.456,0.406:std=0.229,0.224,0.225:epochs=1:batch=4",
        p(&data)
    );
    for method in ["feature-extract", "finetune", "packnet"] {
        let pack = dir.path().join(method);
        let args = ["adapt", p(&vit), "--method", method, "--at", at, "--pool", "cls", "--task", &task, "-o", p(&pack)];
        mtpack(args.iter().chain(&["--quiet"])).expect(0);
        let m = manifest(&pack);
        assert_eq!(m["backbone"]["feature_dim"], 384, "{method}");
        let out = dir.path().join(format!("{method}.onnx"));
        let e = mtpack(["export", p(&pack), "-o", p(&out), "--json"]).expect(0).json();
        assert_eq!(e["verified"]["accuracy_matches_pack"], true, "{method}");
        let ins = mtpack(["inspect", "--json", p(&out)]).expect(0).json();
        assert!(ins["ops"]["ConvTranspose"].is_null(), "{method}: the decoder after the cut is dropped");
        // Each pack and artifact holds the 88 MB encoder twice or more; three at once ran a CI
        // machine's disk full.
        std::fs::remove_dir_all(&pack).unwrap();
        std::fs::remove_file(&out).unwrap();
    }
}

/// `--precision bf16` trains a transformer's linear layers in bf16 on AMX (where the CPU has
/// it) and learns what f32 learns; with the portable ops, which have no bf16 path, it is
/// refused before anything trains.
#[test]
fn a_transformer_trains_in_bf16_as_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let task = format!("low={}:classes=0,1,2,3,4:optimizer=adamw:lr=0.003:epochs=2", p(&digits()));
    let vit = tiny_vit();
    let refused = ["adapt", p(&vit), "--task", &task, "--precision", "bf16", "--kernels", "portable"];
    let r = mtpack(refused.iter().copied().chain(["-o", p(&dir.path().join("no"))])).expect(2);
    assert!(r.stderr.contains("--precision bf16") && r.stderr.contains("portable"), "{}", r.stderr);
    if !std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" amx_bf16")) {
        eprintln!("skipped the bf16 run: this CPU has no AMX-BF16");
        return;
    }
    let mut first = Vec::new();
    for precision in ["f32", "bf16"] {
        let pack = dir.path().join(precision);
        let args = ["adapt", p(&vit), "--method", "finetune", "--task", &task, "--precision", precision];
        let out = mtpack(args.iter().copied().chain(["-o", p(&pack), "--json"])).expect(0);
        assert_eq!(out.stderr.contains("8 linear layers train in bf16 on AMX"), precision == "bf16", "{}", out.stderr);
        let m = manifest(&pack);
        assert_eq!(m["plan"]["precision"].as_str().unwrap_or("f32"), precision);
        first.push(out.json()["accuracy_matrix"][0][0].as_f64().unwrap());
    }
    assert!(first[1] > 0.5 && (first[0] - first[1]).abs() <= 0.1, "f32, bf16: {first:?}");
    // Cut before its fully connected layer, the tiny CNN has no linear layer for bf16 to
    // reach beyond the heads: the run says so.
    let task = format!("low={}:classes=0,1,2:epochs=1", p(&digits()));
    let (cnn, pack) = (tiny(), dir.path().join("cnn"));
    let args = ["adapt", p(&cnn), "--at", "flat", "--task", &task, "--precision", "bf16", "-o", p(&pack)];
    let out = mtpack(args).expect(0);
    assert!(
        out.stderr.contains("reaches only the heads") && out.stderr.contains("convolutions stay f32"),
        "{}",
        out.stderr
    );
}
