use crate::helpers::*;

fn write_idx(path: &std::path::Path, dims: &[u32], data: &[u8]) {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    std::fs::write(path, b).unwrap();
}

/// Imports the bundled UCI digits CSV with extra flags and returns the JSON summary.
fn import_digits(out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let csv = root().join("fixtures/digits/digits.csv.gz");
    let mut args = vec!["data", "import", "csv", p(&csv), "--shape", "1x8x8", "-o", p(out), "--json"];
    args.extend_from_slice(extra);
    mtpack(args).expect(0).json()
}

#[test]
fn csv_import_splits_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.safetensors");
    let j = import_digits(&out, &["--pixel-max", "16", "--test-fraction", "0.25"]);
    assert_eq!(j["train"].as_u64().unwrap() + j["test"].as_u64().unwrap(), 1797);
    assert_eq!(j["test"], 449);
    assert_eq!(j["image_shape"], serde_json::json!([1, 8, 8]));
    let shown = mtpack(["data", "show", p(&out), "--json"]).expect(0).json();
    assert_eq!(shown["per_class"], j["per_class"]);
}

#[test]
fn idx_import_with_test_set_and_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let (img, lab) = (dir.path().join("img"), dir.path().join("lab"));
    write_idx(&img, &[4, 2, 2], &[0, 255, 0, 255, 10, 20, 30, 40, 1, 2, 3, 4, 9, 9, 9, 9]);
    write_idx(&lab, &[4], &[0, 1, 1, 0]);
    let out = dir.path().join("d.safetensors");
    let j = mtpack([
        "data",
        "import",
        "idx",
        "--images",
        p(&img),
        "--labels",
        p(&lab),
        "--test-images",
        p(&img),
        "--test-labels",
        p(&lab),
        "--resize",
        "4x4",
        "--channels",
        "3",
        "--label-names",
        "off,on",
        "-o",
        p(&out),
        "--json",
    ])
    .expect(0)
    .json();
    assert_eq!(j["image_shape"], serde_json::json!([3, 4, 4]));
    assert_eq!(j["dtype"], "float32");
    assert_eq!(j["preprocessing"]["resize"], serde_json::json!([4, 4]));
    assert_eq!(j["per_class"]["1:on"], serde_json::json!([2, 2]));
}

#[test]
fn folder_import_reads_classes_from_subfolders() {
    let dir = tempfile::tempdir().unwrap();
    for (class, shade) in [("cat", 10u8), ("dog", 200u8)] {
        let d = dir.path().join("imgs").join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..3u8 {
            let img = image::GrayImage::from_pixel(5, 4, image::Luma([shade + i]));
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
    let out = dir.path().join("d.safetensors");
    let j = mtpack([
        "data",
        "import",
        "folder",
        p(&dir.path().join("imgs")),
        "--color",
        "grey",
        "--test-fraction",
        "0",
        "-o",
        p(&out),
        "--json",
    ])
    .expect(0)
    .json();
    assert_eq!(j["labels"], serde_json::json!(["cat", "dog"]));
    assert_eq!(j["image_shape"], serde_json::json!([1, 4, 5]));
    assert_eq!(j["train"], 6);
}

#[test]
fn per_class_limits_make_balanced_subsets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.safetensors");
    let j = import_digits(&out, &["--train-per-class", "20", "--test-per-class", "5"]);
    assert_eq!((j["train"].as_u64(), j["test"].as_u64()), (Some(200), Some(50)));
}
