//! The real backbones fetched by scripts/fetch.sh: lossless round trips, cut + new head, and
//! both runtimes agreeing on real images.

use std::path::PathBuf;

use mtpack::data::{import, Preprocessing};
use mtpack::graph::{cut, heads, Patch};
use mtpack::onnx::{build, Model};
use mtpack::runtime::ort_rt::OrtSession;
use mtpack::runtime::tract_rt::TractSession;
use mtpack::runtime::{compare, Backend, Named};
use mtpack::tensor::{max_abs_diff, DType, Tensor};
use prost::Message;

use crate::helpers::*;

struct Backbone {
    path: PathBuf,
    input: &'static str,
    size: usize,
    feature: &'static str,
}

fn backbones() -> Vec<Backbone> {
    vec![
        Backbone { path: tiny(), input: "input", size: 8, feature: "features" },
        Backbone {
            path: fetched("models/pplcnet_orientation.onnx"),
            input: "x",
            size: 224,
            feature: "p2o.pd_op.flatten.0.0",
        },
        Backbone { path: fetched("models/mobilenetv2_imagenet.onnx"), input: "input", size: 64, feature: "features" },
    ]
}

/// Real images: the first Fashion-MNIST test images, resized, and repeated to 3 channels
/// for RGB backbones (the tiny backbone gets UCI digits instead).
fn images(b: &Backbone, n: usize) -> Tensor {
    if b.size == 8 {
        let d = mtpack::data::Dataset::load(&digits()).unwrap();
        let s = d.test.unwrap().select(&(0..n).collect::<Vec<_>>());
        return Tensor::F32(Preprocessing::default().apply(&s.x, 16.0).unwrap().into_dyn());
    }
    let dir = fetched("data/fashion-mnist");
    let s = import::idx(&dir.join("t10k-images-idx3-ubyte.gz"), &dir.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let s = s.select(&(0..n).collect::<Vec<_>>());
    let pre = Preprocessing::imagenet(b.size);
    Tensor::F32(pre.apply(&s.x, 255.0).unwrap().into_dyn())
}

fn run_ort(m: &Model, inputs: &[(String, Tensor)]) -> Named {
    OrtSession::from_bytes(&m.to_bytes(), "test").unwrap().run(inputs).unwrap()
}

fn run_tract(m: &Model, inputs: &[(String, Tensor)]) -> Named {
    TractSession::from_bytes(&m.to_bytes(), "test").unwrap().run(inputs).unwrap()
}

fn worst(d: &[(String, f64)]) -> f64 {
    d.iter().map(|(_, v)| *v).fold(0.0, f64::max)
}

#[test]
fn round_trip_is_lossless_on_every_backbone() {
    let dir = tempfile::tempdir().unwrap();
    for b in backbones() {
        let original = std::fs::read(&b.path).unwrap();
        let m = Model::load(&b.path).unwrap();
        assert_eq!(m.unknown_bytes, 0, "{}: fields dropped", b.path.display());
        // Same fields, same values: re-encoding gives the same size and decodes to the same message.
        let again = m.to_bytes();
        assert_eq!(again.len(), original.len(), "{}", b.path.display());
        assert_eq!(mtpack::onnx::pb::ModelProto::decode(&again[..]).unwrap(), m.proto);
        let saved = dir.path().join("rt.onnx");
        m.save(&saved).unwrap();
        let back = Model::load(&saved).unwrap();
        let inputs = vec![(b.input.to_string(), images(&b, 4))];
        let reference = run_ort(&Model::from_bytes(&original, &b.path).unwrap(), &inputs);
        let ort_back = run_ort(&back, &inputs);
        assert_eq!(worst(&compare(&reference, &ort_back).unwrap()), 0.0, "{}", b.path.display());
        let tract_back = run_tract(&back, &inputs);
        let d = worst(&compare(&reference, &tract_back).unwrap());
        assert!(d < 1e-4, "{}: tract differs from ort by {d}", b.path.display());
    }
}

/// The original model with an extra output exposing `tensor`.
fn exposing(m: &Model, tensor: &str) -> Model {
    Patch::new().add_output(build::value_info(tensor, DType::F32, None)).apply(m).unwrap()
}

#[test]
fn cut_and_new_head_on_every_backbone() {
    for b in backbones() {
        let m = Model::load(&b.path).unwrap();
        let inputs = vec![(b.input.to_string(), images(&b, 4))];
        let (prefix, suffix) = cut::cut(&m, b.feature).unwrap();
        // The prefix computes exactly the original graph's tensor.
        let full = run_ort(&exposing(&m, b.feature), &inputs);
        let want = full.iter().find(|(n, _)| n == b.feature).map(|(_, t)| t).unwrap();
        let got = run_ort(&prefix, &inputs);
        assert_eq!(max_abs_diff(want, &got[0].1), Some(0.0), "{}", b.path.display());
        // prefix then suffix == the whole model, when the model has a head after the cut.
        if !suffix.graph().node.is_empty() {
            let rest = run_ort(&suffix, &[(b.feature.to_string(), got[0].1.clone())]);
            let whole = run_ort(&m, &inputs);
            assert!(worst(&compare(&whole, &rest).unwrap()) < 1e-6, "{}", b.path.display());
        }
        // A new 5-class head on the feature tensor: ort and tract agree.
        let width = match want.shape() {
            [_, w] => *w,
            other => panic!("feature of {} has shape {other:?}", b.path.display()),
        };
        let with_head =
            heads::add_heads(&m, b.feature, &[("task".into(), heads::LinearHead::init(5, width, 1))], true).unwrap();
        let (o, t) = (run_ort(&with_head, &inputs), run_tract(&with_head, &inputs));
        assert_eq!(o[0].1.shape(), &[4, 5]);
        let d = worst(&compare(&o, &t).unwrap());
        assert!(d < 1e-4, "{}: ort and tract differ by {d} on the new head", b.path.display());
    }
}

#[test]
fn inspect_names_head_and_feature_of_real_backbones() {
    let j = mtpack(["inspect", "--json", p(&fetched("models/pplcnet_orientation.onnx"))]).expect(0).json();
    assert_eq!(j["head"]["classes"], 4);
    assert_eq!(j["head"]["normalised"], "Softmax");
    assert_eq!(j["feature"]["tensor"], "p2o.pd_op.flatten.0.0");
    assert_eq!(j["feature"]["dim"], 1280);
    let j = mtpack(["inspect", "--json", p(&fetched("models/mobilenetv2_imagenet.onnx"))]).expect(0).json();
    assert!(j["head"].is_null());
    assert_eq!(j["feature"]["tensor"], "features");
    assert_eq!(j["feature"]["dim"], 1280);
    assert_eq!(j["parameters"]["count"], 2_257_986);
    assert_eq!(j["trainable"].as_array().unwrap().len(), 52);
}

#[test]
fn run_real_backbone_on_real_images_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("fmnist.safetensors");
    let fm = fetched("data/fashion-mnist");
    let (img, lab) = (fm.join("t10k-images-idx3-ubyte.gz"), fm.join("t10k-labels-idx1-ubyte.gz"));
    mtpack(["data", "import", "idx", "--images", p(&img), "--labels", p(&lab), "--test-per-class", "1", "-o", p(&f)])
        .expect(0);
    let m = fetched("models/mobilenetv2_imagenet.onnx");
    let j = mtpack(["run", p(&m), "--input", p(&f), "--resize", "64x64", "--channels", "3", "--json"]).expect(0).json();
    assert_eq!(j["agree"], true);
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([10, 1280]));
}

#[test]
fn engine_forward_matches_onnx_runtime_on_real_images() {
    use candle_core::Device;
    use mtpack::engine::CandleSession;
    for b in backbones() {
        let m = Model::load(&b.path).unwrap();
        // Compare the feature tensor too, not only (possibly softmaxed) outputs.
        let exposed =
            if m.graph().output.iter().any(|o| o.name() == b.feature) { m.clone() } else { exposing(&m, b.feature) };
        let inputs = vec![(b.input.to_string(), images(&b, 4))];
        let reference = run_ort(&exposed, &inputs);
        let ours = CandleSession::new(&exposed, &Device::Cpu).unwrap().run(&inputs).unwrap();
        let d = worst(&compare(&reference, &ours).unwrap());
        assert!(d < 1e-4, "{}: candle differs from ONNX Runtime by {d}", b.path.display());
    }
}
