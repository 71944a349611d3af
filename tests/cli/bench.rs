//! `mtpack bench` and `mtpack report` through the real binary, on the tiny backbone.

use std::path::Path;

use crate::helpers::*;

fn tiny_plan(dir: &Path) -> std::path::PathBuf {
    let digits = p(&digits()).to_string();
    let text = format!(
        "method = \"finetune\"\nseed = 1\n[[task]]\nname = \"low\"\ndataset = \"{digits}\"\nclasses = [0, 1, 2, 3, 4]\ntrain_per_class = 60\n\
         [[task]]\nname = \"high\"\ndataset = \"{digits}\"\nclasses = [5, 6, 7, 8, 9]\ntrain_per_class = 60\n"
    );
    let plan = dir.join("plan.toml");
    std::fs::write(&plan, text).unwrap();
    plan
}

#[test]
fn bench_measures_each_method_and_reruns_to_the_same_accuracies() {
    let dir = tempfile::tempdir().unwrap();
    let plan = tiny_plan(dir.path());
    let out = dir.path().join("bench");
    let args = ["bench", "--plan", p(&plan), "--methods", "finetune,joint,packnet", "-o", p(&out), "--json", "--quiet"];
    let j = mtpack(args).expect(0).json();
    assert_eq!(schema_violation(&schema("bench.schema.json"), &j, "$"), None);
    assert_eq!(j["schema"], "mtpack.bench/1");
    assert_eq!(j["columns"], serde_json::json!(["backbone", "low", "high"]));
    let rows = j["methods"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(names, ["finetune", "joint", "packnet"]);
    for r in rows {
        let m = r["method"].as_str().unwrap();
        // Numbers from the run: the pack's own accuracy matrix, a real process, a real file.
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(Path::new(r["pack"].as_str().unwrap()).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(r["final_accuracy"], *manifest["accuracy_matrix"].as_array().unwrap().last().unwrap(), "{m}");
        assert!(r["adapt_seconds"].as_f64().unwrap() > 0.0, "{m}");
        assert!(r["peak_memory_mb"].as_f64().unwrap() > 10.0, "{m}");
        let size = std::fs::metadata(out.join(format!("{m}.onnx"))).unwrap().len();
        assert_eq!(r["artifact_bytes"].as_u64().unwrap(), size, "{m}");
        assert_eq!(r["latency_ms"].as_array().unwrap().len(), 2, "{m}");
        assert_eq!(r["needs_old_data"], m == "joint");
    }
    // PackNet's owner ids make its artifact larger than a shared-backbone one.
    assert!(rows[2]["artifact_vs_backbone"].as_f64().unwrap() > rows[0]["artifact_vs_backbone"].as_f64().unwrap());
    let again = mtpack(args).expect(0).json();
    for (a, b) in rows.iter().zip(again["methods"].as_array().unwrap()) {
        assert_eq!(a["final_accuracy"], b["final_accuracy"], "{}", a["method"]);
    }
    // The comparison page and its picture, from the bench's own output directory.
    let html = dir.path().join("compare.html");
    mtpack(["report", p(&out), "-o", p(&html), "--quiet"]).expect(0);
    let page = std::fs::read_to_string(&html).unwrap();
    let figure = std::fs::read_to_string(html.with_extension("svg")).unwrap();
    for needle in ["finetune", "joint", "packnet", "low", "high", "forgetting", "old data", "training speed"] {
        assert!(page.contains(needle) && figure.contains(needle), "{needle} missing");
    }
    assert_static(&page);
    let acc = format!("{:.3}", rows[2]["final_accuracy"][2].as_f64().unwrap());
    assert!(figure.contains(&format!(">{acc}</text>")), "packnet's accuracy {acc} is not drawn");
    assert_text_drawn(&html.with_extension("png"), &figure);
    // Markdown without --json.
    let md = mtpack(["bench", "--plan", p(&plan), "--methods", "feature-extract", "-o", p(&out), "--quiet"]).expect(0);
    assert!(md.stdout.contains("| feature-extract |"), "{}", md.stdout);
}

#[test]
fn report_renders_a_static_page_naming_every_task() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let (t1, t2) = (format!("alpha={}:classes=0,1,2", p(&digits())), format!("beta={}:classes=3,4,5", p(&digits())));
    mtpack(["adapt", "--method", "lwf", "--task", &t1, "--task", &t2, "-o", p(&pack), "--quiet"]).expect(0);
    let html = dir.path().join("report.html");
    mtpack(["report", p(&pack), "-o", p(&html), "--quiet"]).expect(0);
    let page = std::fs::read_to_string(&html).unwrap();
    for needle in ["alpha", "beta", "backbone", "<svg", "Accuracy matrix", "Training loss"] {
        assert!(page.contains(needle), "the page lacks {needle}");
    }
    assert_static(&page);
    // The PNG is the page's drawing with its text: task names and the matrix's values.
    let figure = std::fs::read_to_string(html.with_extension("svg")).unwrap();
    let m = manifest(&pack);
    let last = m["accuracy_matrix"].as_array().unwrap().last().unwrap().as_array().unwrap().clone();
    for v in last {
        let cell = format!(">{:.3}</text>", v.as_f64().unwrap());
        assert!(figure.contains(&cell) && page.contains(&cell), "{cell} missing");
    }
    assert!(figure.contains(">alpha</text>") && figure.contains(">beta</text>"));
    assert_text_drawn(&html.with_extension("png"), &figure);
    // A page named like its figure would be overwritten by it: refused, nothing written.
    let clash = dir.path().join("figure.png");
    let r = mtpack(["report", p(&pack), "-o", p(&clash)]).expect(2);
    assert!(r.stderr.contains("figure.png") && r.stderr.contains(".html"), "{}", r.stderr);
    assert!(!clash.exists());
    let r = mtpack(["report", p(&dir.path().join("nope")), "-o", p(&html)]).expect(2);
    assert!(r.stderr.contains("nope") && r.stderr.contains("bench.json"), "{}", r.stderr);
}

/// Nothing to fetch: no scripts, no external references.
fn assert_static(page: &str) {
    for banned in ["<script", "http:", "https:", "src=", "href="] {
        assert!(!page.contains(banned), "the page contains {banned}");
    }
}

/// The PNG written beside a page is `figure` drawn at twice its size, and it differs from the
/// same drawing with the text removed by thousands of pixels.
fn assert_text_drawn(png: &Path, figure: &str) {
    let written = image::open(png).unwrap().to_rgb8();
    let bare =
        image::load_from_memory(&mtpack::report::render_png(&mtpack::report::svg::without_text(figure)).unwrap())
            .unwrap()
            .to_rgb8();
    assert_eq!(written.dimensions(), bare.dimensions());
    assert!(written.width() > 600 && written.height() > 400, "{:?}", written.dimensions());
    let differ = written.pixels().zip(bare.pixels()).filter(|(a, b)| a != b).count();
    assert!(differ > 5_000, "only {differ} pixels come from text");
    let non_white = bare.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(non_white > 5_000, "the drawing is blank");
}
