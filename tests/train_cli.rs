//! `sd-lora train` end to end on the tiny diffusers fixture: run folder, samples, disk cache,
//! f16 files, resume, SIGKILL at random moments, a failing checkpoint write, bad input.

mod common;

use candle_core::{DType, Device};
use common::{tiny_pipeline, write_images};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixture pipeline with four training images, and a run folder.
struct Setup {
    model: tempfile::TempDir,
    images: PathBuf,
    runs: tempfile::TempDir,
}

fn setup() -> Setup {
    let model = tiny_pipeline();
    let images = model.path().join("images");
    write_images(&images);
    Setup {
        model,
        images,
        runs: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    /// `train` arguments for run folder `run`, `steps` optimizer steps, a checkpoint every step
    /// unless `extra` says otherwise.
    fn args(&self, run: &str, steps: usize, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--model",
            self.model.path().to_str().unwrap(),
            "--variant",
            "fp16",
            "--data",
            self.images.to_str().unwrap(),
            "--out",
            self.out(run).to_str().unwrap(),
            "--resolution",
            "32",
            "--rank",
            "4",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--lr",
            "1e-3",
            "--caption",
            "a red circle",
            "--max-steps",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(steps.to_string());
        // options in `extra` replace the defaults above
        for opt in extra.iter().filter(|o| o.starts_with("--")) {
            // the instance prompt is the caption
            let opt = if *opt == "--instance-prompt" {
                "--caption"
            } else {
                opt
            };
            if let Some(i) = a.iter().position(|x| x == opt) {
                a.drain(i..i + 2);
            }
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }
    fn out(&self, run: &str) -> PathBuf {
        self.runs.path().join(run)
    }
}

fn sd_lora(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

fn fails_with(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).unwrap().lines().count()
}

fn tensors(p: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn same_tensors(a: &Path, b: &Path) -> bool {
    let (a, b) = (tensors(a), tensors(b));
    a.len() == b.len()
        && a.iter().all(|(k, x)| {
            let y = &b[k];
            let f = |t: &candle_core::Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            x.dims() == y.dims() && f(x) == f(y)
        })
}

#[test]
fn cli_train_writes_files_samples_and_resumes() {
    let s = setup();
    let out = s.out("run");
    let err = ok(&sd_lora(&s.args(
        "run",
        6,
        &[
            "--save-every",
            "3",
            "--sample-every",
            "3",
            "--sample-prompt",
            "a red circle",
            "--sample-prompt",
            "a blue square",
            "--sample-steps",
            "2",
            "--save-dtype",
            "f16",
        ],
    )));
    assert!(err.contains("4 images encoded, 0 from"), "{err}");
    for f in [
        "lora.safetensors",
        "lora_peft.safetensors",
        "metrics.csv",
        "checkpoints/checkpoint-000003.safetensors",
        "checkpoints/checkpoint-000006.safetensors",
        "cache/latents-32x32.safetensors",
        "loss.svg",
        "loss.png",
        "anatomy.svg",
        "spectrum.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for step in [0, 3, 6] {
        for p in 0..2 {
            let f = out.join(format!("samples/step-{step:06}-{p}.png"));
            let img = image::open(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert_eq!((img.width(), img.height()), (32, 32));
        }
    }
    assert_eq!(lines(&out.join("metrics.csv")), 7);
    assert!(std::fs::read_to_string(out.join("loss.svg"))
        .unwrap()
        .contains("learning rate"));
    assert_eq!(image::open(out.join("loss.png")).unwrap().width(), 800);
    // f16 files: every tensor (kohya's alpha too) is f16, and the kohya file carries the
    // training settings
    for f in ["lora.safetensors", "lora_peft.safetensors"] {
        assert!(tensors(&out.join(f))
            .values()
            .all(|t| t.dtype() == DType::F16));
    }
    let bytes = std::fs::read(out.join("lora.safetensors")).unwrap();
    let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = h.metadata().clone().unwrap();
    assert_eq!(
        (
            meta["ss_network_dim"].as_str(),
            meta["ss_network_alpha"].as_str(),
            meta["ss_max_train_steps"].as_str(),
            meta["ss_save_precision"].as_str()
        ),
        ("4", "8", "6", "f16")
    );
    // ...and loads back into the model
    let mut sd = sd_lora::pipeline::StableDiffusion::from_folder(
        s.model.path(),
        Some("fp16"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    use sd_lora::lora::LoraModel;
    let lf = sd_lora::lora::LoraFile::open(out.join("lora.safetensors")).unwrap();
    let summary = sd
        .unet
        .apply_lora_file(&lf, &candle_nn::VarMap::new())
        .unwrap();
    assert_eq!(
        summary.lora_layers, 24,
        "q,k,v of attn1 and attn2 in the fixture's 4 transformers"
    );
    // sd-lora plot: one run, several runs, bad input
    let fig = s.out("runs.svg");
    let o = sd_lora(&[
        "plot".to_string(),
        out.to_str().unwrap().into(),
        out.join("metrics.csv").to_str().unwrap().into(),
        "--out".into(),
        fig.to_str().unwrap().into(),
    ]);
    ok(&o);
    assert!(std::fs::read_to_string(&fig).unwrap().contains(">\nrun\n<"));
    std::fs::write(
        s.out("bad.csv"),
        "step,epoch,loss,lr,grad_norm,seconds\n1,0,x,1,1,1\n",
    )
    .unwrap();
    fails_with(
        &sd_lora(&[
            "plot".to_string(),
            s.out("bad.csv").to_str().unwrap().into(),
            "--out".into(),
            fig.to_str().unwrap().into(),
        ]),
        &["bad.csv line 2"],
    );
    // --resume extends the run from the last checkpoint, without re-encoding anything
    let err = ok(&sd_lora(&s.args(
        "run",
        8,
        &["--save-every", "3", "--resume"],
    )));
    assert!(err.contains("resumed from"), "{err}");
    assert!(err.contains("0 images encoded, 4 from"), "{err}");
    assert!(err.contains("0 captions encoded"), "{err}");
    assert_eq!(lines(&out.join("metrics.csv")), 9);
    assert!(out
        .join("checkpoints/checkpoint-000008.safetensors")
        .is_file());
}

/// SIGKILL at many moments (loading, caching, training, checkpointing, saving), then
/// `--resume` until done: the adapter equals that of an uninterrupted run bit for bit.
#[test]
fn sigkill_at_random_moments_then_resume_gives_the_identical_adapter() {
    let s = setup();
    ok(&sd_lora(&s.args("whole", 8, &["--save-every", "1"])));
    let args = s.args("killed", 8, &["--save-every", "1", "--resume"]);
    // steps logged so far (a run appends one metrics line per step)
    let metrics = s.out("killed").join("metrics.csv");
    let progress = || {
        std::fs::read_to_string(&metrics)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let mut kills = 0;
    let mut finished = false;
    for i in 0..40u64 {
        let start = progress();
        let t = std::time::Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sd-lora"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // even tries: a deterministic early moment (start-up, cache, the first step); odd
        // tries: a deterministic moment after the run made one more step (mid-step, during a
        // checkpoint write), so kills land whatever the machine's speed
        if i % 2 == 0 {
            std::thread::sleep(std::time::Duration::from_millis((i * 7919 + 13) % 40));
        } else {
            while progress() <= start
                && child.try_wait().unwrap().is_none()
                && t.elapsed().as_secs() < 60
            {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            std::thread::sleep(std::time::Duration::from_millis((i * 13) % 20));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        let status = child.wait().unwrap();
        if status.success() {
            finished = true;
            break;
        }
        // whatever the moment, the newest checkpoint is complete and loads
        let ckpts = s.out("killed").join("checkpoints");
        if let Some(p) = sd_lora::train::checkpoint::latest(&ckpts).unwrap() {
            safetensors::SafeTensors::deserialize(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{} is half-written: {e}", p.display()));
        }
    }
    if !finished {
        ok(&sd_lora(&args));
    }
    assert!(kills >= 3, "only {kills} kills landed during a run");
    eprintln!("{kills} SIGKILLs before the run completed");
    for f in ["lora.safetensors", "lora_peft.safetensors"] {
        assert!(
            same_tensors(&s.out("whole").join(f), &s.out("killed").join(f)),
            "{f} differs after {kills} kills"
        );
    }
    assert_eq!(lines(&s.out("killed").join("metrics.csv")), 9);
    // no temporary files left behind by killed writes
    let litter: Vec<_> = ["", "checkpoints", "cache"]
        .iter()
        .flat_map(|d| std::fs::read_dir(s.out("killed").join(d)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(litter.is_empty(), "{litter:?}");
}

/// A write that fails part-way (here: a file-size limit, as a full disk would) stops the run
/// with an error naming the file and leaves the previous checkpoint intact and loadable.
#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let s = setup();
    ok(&sd_lora(&s.args("run", 2, &["--save-every", "2"])));
    let ckpts = s.out("run").join("checkpoints");
    let good = ckpts.join("checkpoint-000002.safetensors");
    let before = std::fs::read(&good).unwrap();
    let size_kb = before.len() / 1024;
    // limit files to half a checkpoint (metrics.csv stays far below); ignore SIGXFSZ so the
    // write fails with EFBIG instead of killing the process
    let args: Vec<String> = s
        .args(
            "run",
            4,
            &["--save-every", "2", "--resume", "--no-disk-cache"],
        )
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let script = format!(
        "trap '' XFSZ; ulimit -f {}; exec '{}' {}",
        size_kb, // in 512-byte blocks under sh: half the checkpoint
        env!("CARGO_BIN_EXE_sd-lora"),
        args.join(" ")
    );
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    fails_with(&o, &["checkpoint-000004.safetensors"]);
    assert_eq!(
        std::fs::read(&good).unwrap(),
        before,
        "previous checkpoint changed"
    );
    assert!(!ckpts.join("checkpoint-000004.safetensors").exists());
    assert_eq!(
        sd_lora::train::checkpoint::latest(&ckpts).unwrap(),
        Some(good)
    );
    // and the run still resumes from it
    ok(&sd_lora(&s.args(
        "run",
        4,
        &["--save-every", "2", "--resume"],
    )));
    assert!(ckpts.join("checkpoint-000004.safetensors").is_file());
}

#[test]
fn bad_train_inputs_give_clear_messages() {
    let s = setup();
    // missing and empty image folders
    fails_with(
        &sd_lora(&s.args("r1", 2, &["--data", "/no/such/images"])),
        &["/no/such/images"],
    );
    let empty = s.runs.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.md"), "not an image").unwrap();
    let e = empty.to_str().unwrap();
    fails_with(
        &sd_lora(&s.args("r1", 2, &["--data", e])),
        &["no images", e],
    );
    // a broken image names the file; --skip-bad-images warns and counts it
    std::fs::write(s.images.join("broken.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    fails_with(&sd_lora(&s.args("r2", 1, &[])), &["broken.png"]);
    let err = ok(&sd_lora(&s.args("r3", 1, &["--skip-bad-images"])));
    assert!(
        err.contains("broken.png") && err.contains("skipped 1"),
        "{err}"
    );
    std::fs::remove_file(s.images.join("broken.png")).unwrap();
    // fewer images than the batch: a warning, and the run works
    let err = ok(&sd_lora(&s.args("r4", 1, &["--batch-size", "8"])));
    assert!(err.contains("4 images for a batch size of 8"), "{err}");
    // sidecar captions: a missing sidecar is reported, a non-UTF-8 one is an error naming it
    let err = ok(&sd_lora(&s.args("r5", 1, &["--caption", "sidecar"])));
    assert!(err.contains("img0.txt"), "{err}");
    std::fs::write(s.images.join("img1.txt"), b"caf\xe9").unwrap();
    fails_with(
        &sd_lora(&s.args("r6", 1, &["--caption", "sidecar"])),
        &["img1.txt", "UTF-8"],
    );
    std::fs::remove_file(s.images.join("img1.txt")).unwrap();
    // settings
    fails_with(
        &sd_lora(&s.args("r7", 1, &["--resolution", "30"])),
        &["--resolution", "30"],
    );
    fails_with(
        &sd_lora(&s.args("r8", 1, &["--save-dtype", "f8"])),
        &["--save-dtype", "f8"],
    );
    fails_with(
        &sd_lora(&s.args("r9", 1, &["--sample-every", "2"])),
        &["--sample-prompt"],
    );
    fails_with(
        &sd_lora(&s.args("r10", 1, &["--lr-scheduler", "linear"])),
        &["--lr-scheduler", "linear"],
    );
    fails_with(
        &sd_lora(&s.args("r11", 1, &["--lr", "0"])),
        &["learning rate"],
    );
    // a corrupt disk cache is rebuilt with a warning, never trusted
    let out = s.out("r12");
    ok(&sd_lora(&s.args("r12", 1, &[])));
    std::fs::write(out.join("cache/latents-32x32.safetensors"), b"garbage").unwrap();
    let err = ok(&sd_lora(&s.args("r12", 1, &[])));
    assert!(
        err.contains("unreadable") && err.contains("4 images encoded"),
        "{err}"
    );
}

/// `--network dora` trains A, B and a magnitude per output row; a run interrupted and resumed
/// gives the identical adapter; the files carry `dora_scale` / `lora_magnitude_vector` and
/// `inspect-lora` describes them.
#[test]
fn dora_trains_resumes_bit_identically_and_writes_dora_files() {
    let s = setup();
    ok(&sd_lora(&s.args(
        "straight",
        4,
        &["--network", "dora", "--save-every", "4"],
    )));
    ok(&sd_lora(&s.args(
        "split",
        2,
        &["--network", "dora", "--save-every", "2"],
    )));
    ok(&sd_lora(&s.args(
        "split",
        4,
        &["--network", "dora", "--save-every", "2", "--resume"],
    )));
    let read = |run: &str, f: &str| {
        candle_core::safetensors::load(s.out(run).join(f), &candle_core::Device::Cpu).unwrap()
    };
    for f in ["lora.safetensors", "lora_peft.safetensors"] {
        let (a, b) = (read("straight", f), read("split", f));
        assert_eq!(a.len(), b.len());
        let mags = a
            .keys()
            .filter(|k| k.ends_with(".dora_scale") || k.ends_with(".lora_magnitude_vector"))
            .count();
        assert!(
            mags > 0 && mags * 3 == a.len() - if f == "lora.safetensors" { mags } else { 0 },
            "{f}: {mags} of {}",
            a.len()
        );
        for (k, t) in &a {
            let d = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(
                d.to_scalar::<f32>().unwrap(),
                0.0,
                "{f}: {k} differs after resume"
            );
        }
    }
    let o = sd_lora(&[
        "inspect-lora".into(),
        s.out("straight")
            .join("lora.safetensors")
            .to_str()
            .unwrap()
            .into(),
        "--model".into(),
        s.model.path().to_str().unwrap().into(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("LoRA+DoRA"), "{text}");
}

#[test]
fn locon_with_text_encoder_trains_resumes_bit_identically_and_writes_complete_files() {
    let s = setup();
    let extra = |steps: &str| -> Vec<String> {
        [
            "--network",
            "locon",
            "--conv-rank",
            "2",
            "--conv-alpha",
            "1",
            "--train-text-encoder",
            "--text-encoder-lr",
            "5e-4",
            "--save-every",
            steps,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let with = |run: &str, steps: usize, every: &str, resume: bool| {
        let mut e = extra(every);
        if resume {
            e.push("--resume".into());
        }
        let e: Vec<&str> = e.iter().map(|x| x.as_str()).collect();
        ok(&sd_lora(&s.args(run, steps, &e)))
    };
    let log = with("straight", 4, "4", false);
    assert!(log.contains("text encoder:"), "{log}");
    with("split", 2, "2", false);
    with("split", 4, "2", true);
    for f in ["lora.safetensors", "lora_peft.safetensors"] {
        assert!(
            same_tensors(&s.out("straight").join(f), &s.out("split").join(f)),
            "{f} differs after resume"
        );
    }
    let kohya = tensors(&s.out("straight").join("lora.safetensors"));
    let te_ups: Vec<&String> = kohya
        .keys()
        .filter(|k| {
            k.starts_with("lora_te_text_model_encoder_layers_") && k.ends_with(".lora_up.weight")
        })
        .collect();
    // every q/k/v/out_proj/fc1/fc2 of every text-encoder layer, trained away from zero
    assert!(
        te_ups.len() >= 6 && te_ups.len().is_multiple_of(6),
        "{te_ups:?}"
    );
    for k in &te_ups {
        let m = common::max_abs(&kohya[*k]);
        assert!(m > 0.0, "{k} was not trained");
    }
    let conv_down = &kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"];
    assert_eq!(conv_down.dims()[0], 2);
    assert_eq!(&conv_down.dims()[2..], &[3, 3]);
    assert_eq!(
        kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].dims()[1..],
        [2, 1, 1]
    );
    let meta = sd_lora_meta(&s.out("straight").join("lora.safetensors"));
    assert_eq!(meta["ss_network_train_unet_only"], "False");
    assert_eq!(meta["ss_text_encoder_lr"], "0.0005");
    assert_eq!(
        meta["ss_network_args"],
        r#"{"conv_alpha":"1","conv_dim":"2"}"#
    );
    let peft = tensors(&s.out("straight").join("lora_peft.safetensors"));
    assert!(
        peft.keys()
            .any(|k| k
                .starts_with("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A"))
    );
    assert!(peft.contains_key("unet.down_blocks.0.resnets.0.conv1.lora_A.weight"));
    // inspect-lora matches every tensor of both files against the model
    for f in ["lora.safetensors", "lora_peft.safetensors"] {
        let o = sd_lora(&[
            "inspect-lora".into(),
            s.out("straight").join(f).to_str().unwrap().into(),
            "--model".into(),
            s.model.path().to_str().unwrap().into(),
        ]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{text}");
        assert!(
            text.contains("text encoder") && !text.contains("NOT MATCHED"),
            "{text}"
        );
    }
    fails_with(
        &sd_lora(&s.args("bad", 1, &["--conv-rank", "2"])),
        &["--conv-rank", "--network locon"],
    );
    fails_with(
        &sd_lora(&s.args("bad", 1, &["--text-encoder-lr", "1e-4"])),
        &["--train-text-encoder"],
    );
}

/// Runs `straight` (4 steps) and `split` (2, then resumed to 4) with `opts`; asserts both LoRA
/// files are bit-identical; returns the straight run's log.
fn straight_and_split_runs_agree(s: &Setup, opts: &[&str]) -> String {
    let run = |name: &str, steps: usize, every: &str, resume: bool| {
        let mut e = opts.to_vec();
        e.extend(["--save-every", every]);
        if resume {
            e.push("--resume");
        }
        ok(&sd_lora(&s.args(name, steps, &e)))
    };
    let log = run("straight", 4, "4", false);
    run("split", 2, "2", false);
    run("split", 4, "2", true);
    for f in ["lora.safetensors", "lora_peft.safetensors"] {
        assert!(
            same_tensors(&s.out("straight").join(f), &s.out("split").join(f)),
            "{f} differs after resume"
        );
    }
    log
}

fn sd_lora_meta(p: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn bucketed_training_runs_resumes_bit_identically_and_records_the_buckets() {
    let s = setup();
    let mixed = s.runs.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for (i, (w, h)) in [(40u32, 70u32), (90, 45), (50, 50), (60, 100), (128, 60)]
        .iter()
        .enumerate()
    {
        image::RgbImage::from_fn(*w, *h, |x, y| {
            image::Rgb([(x * 3 + i as u32 * 40) as u8, (y * 2) as u8, 90])
        })
        .save(mixed.join(format!("{i}.png")))
        .unwrap();
    }
    let data = mixed.to_str().unwrap();
    let opts = [
        "--data",
        data,
        "--resolution",
        "64",
        "--enable-bucket",
        "--min-bucket-reso",
        "32",
        "--max-bucket-reso",
        "128",
        "--bucket-reso-steps",
        "32",
    ];
    let log = straight_and_split_runs_agree(&s, &opts);
    assert!(log.contains("buckets (5 images"), "{log}");
    let meta = sd_lora_meta(&s.out("straight").join("lora.safetensors"));
    assert_eq!(meta["ss_enable_bucket"], "True");
    let info: serde_json::Value = serde_json::from_str(&meta["ss_bucket_info"]).unwrap();
    let counts: u64 = info["buckets"]
        .as_object()
        .unwrap()
        .values()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counts, 5);
    fails_with(
        &sd_lora(&s.args("bad", 1, &["--min-bucket-reso", "32"])),
        &["--enable-bucket"],
    );
}

#[test]
fn kohya_folders_with_caption_processing_resume_bit_identically() {
    let s = setup();
    let root = s.runs.path().join("kohya");
    for (dir, name, caption) in [
        ("3_mychar", "a", Some("mychar, 1girl, red hair, smile")),
        ("3_mychar", "b", None),
        ("1_style", "c", Some("watercolor, 1girl, hat")),
    ] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        image::RgbImage::from_fn(40, 40, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 3) as u8, 80])
        })
        .save(d.join(format!("{name}.png")))
        .unwrap();
        if let Some(c) = caption {
            std::fs::write(d.join(format!("{name}.caption")), c).unwrap();
        }
    }
    let data = root.to_str().unwrap();
    straight_and_split_runs_agree(
        &s,
        &[
            "--data",
            data,
            "--caption",
            "sidecar",
            "--caption-extension",
            ".caption",
            "--shuffle-caption",
            "--keep-tokens",
            "1",
            "--caption-tag-dropout",
            "0.2",
        ],
    );
    let meta = sd_lora_meta(&s.out("straight").join("lora.safetensors"));
    assert_eq!(meta["ss_num_train_images"], "7", "3 x 2 + 1 x 1");
    let dirs: serde_json::Value = serde_json::from_str(&meta["ss_dataset_dirs"]).unwrap();
    assert_eq!(dirs["3_mychar"]["n_repeats"], 3);
    assert_eq!(dirs["3_mychar"]["img_count"], 2);
    let tags: serde_json::Value = serde_json::from_str(&meta["ss_tag_frequency"]).unwrap();
    assert_eq!(
        tags["3_mychar"]["mychar"], 2,
        "the fallback caption is the folder's name"
    );
    assert_eq!(meta["ss_shuffle_caption"], "True");
    assert_eq!(meta["ss_keep_tokens"], "1");
}

#[test]
fn dreambooth_generates_class_images_once_and_resumes_bit_identically() {
    let s = setup();
    let class = s.runs.path().join("class");
    let opts = [
        "--instance-prompt",
        "a photo of sks circle",
        "--class-data",
        class.to_str().unwrap(),
        "--class-prompt",
        "a photo of a circle",
        "--num-class-images",
        "3",
        "--class-steps",
        "2",
        "--prior-loss-weight",
        "0.5",
    ];
    let log = straight_and_split_runs_agree(&s, &opts);
    assert!(log.contains("generating 3 more"), "{log}");
    assert!(
        log.contains("prior preservation: 3 class images") && log.contains("0 there before"),
        "{log}"
    );
    assert!(
        log.contains("class images' latent cache: 3 images encoded"),
        "{log}"
    );
    // made once: the split and resumed runs found them
    assert_eq!(sd_lora::data::image_paths(&class).unwrap().len(), 3);
    let meta = sd_lora_meta(&s.out("split").join("lora.safetensors"));
    assert_eq!(meta["ss_num_reg_images"], "3");
    assert_eq!(meta["ss_prior_loss_weight"], "0.5");
    let reg: serde_json::Value = serde_json::from_str(&meta["ss_reg_dataset_dirs"]).unwrap();
    assert_eq!(reg["class"]["img_count"], 3, "{reg}");
    assert!(meta["ss_tag_frequency"].contains("a photo of sks circle"));
    // bad combinations name the flags
    let class_arg = class.to_str().unwrap();
    fails_with(
        &sd_lora(&s.args("bad", 1, &["--class-data", class_arg])),
        &["--class-prompt"],
    );
    fails_with(
        &sd_lora(&s.args("bad", 1, &["--prior-loss-weight", "2"])),
        &["--class-data"],
    );
    let mut both = s.args("bad", 1, &["--instance-prompt", "sks"]);
    both.extend(["--caption".into(), "x".into()]);
    fails_with(&sd_lora(&both), &["--instance-prompt", "--caption"]);
}

#[test]
fn f16_training_scales_the_loss_and_resumes_bit_identically() {
    let s = setup();
    let log = straight_and_split_runs_agree(&s, &["--dtype", "f16", "--gradient-checkpointing"]);
    assert!(
        log.contains("f16: dynamic loss scaling from 65536"),
        "{log}"
    );
    assert!(log.contains("memory estimate: peak"), "{log}");
    let meta = sd_lora_meta(&s.out("straight").join("lora.safetensors"));
    assert_eq!(meta["ss_mixed_precision"], "fp16");
    assert_eq!(meta["ss_gradient_checkpointing"], "True");
    // the scaler's state is in the checkpoint
    let ckpt = s
        .out("split")
        .join("checkpoints/checkpoint-000004.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let state: serde_json::Value = serde_json::from_str(
        header["__metadata__"]["sd_lora_train_state"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["scaler"]["scale"], 65536.0, "{}", state["scaler"]);
    assert_eq!(state["scaler"]["growth_tracker"], 4);
}
