//! Schedulers against diffusers (tests/golden/make_golden_schedulers.py): timesteps exactly,
//! noise schedule, add_noise / velocity and every step of DDPM, DDIM, Euler-ancestral
//! trajectories to 1e-5 relative.

mod common;

use candle_core::Tensor;
use common::{load, rel_err};
use sd_lora::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use std::collections::HashMap;

fn configs() -> serde_json::Value {
    let text = std::fs::read_to_string(common::golden("schedulers/schedulers.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn config(name: &str) -> SchedulerConfig {
    serde_json::from_value(configs()["configs"][name].clone()).unwrap()
}

fn kind(k: &str) -> SchedulerKind {
    match k {
        "ddpm" => SchedulerKind::Ddpm,
        "ddim" => SchedulerKind::Ddim,
        _ => SchedulerKind::EulerAncestral,
    }
}

const TOL: f32 = 1e-5;

#[test]
fn sd15_preset_matches_its_config_file_values() {
    assert_eq!(
        config("sd15_eps").beta_schedule,
        SchedulerConfig::sd_v1_5().beta_schedule
    );
    let a = SchedulerConfig::sd_v1_5().alphas_cumprod();
    let r = load("schedulers/schedulers.safetensors")["sd15_eps.alphas_cumprod"].clone();
    let ours = Tensor::new(
        a.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(rel_err(&ours, &r) < 1e-6);
}

#[test]
fn forward_process_matches_diffusers() {
    let t = load("schedulers/schedulers.safetensors");
    for name in ["sd15_eps", "v_trailing", "linear_linspace"] {
        let s = Scheduler::new(SchedulerKind::Ddpm, &config(name), 10).unwrap();
        let noisy = s.add_noise(&t["x0"], &t["noise"], &t["t"]).unwrap();
        assert!(
            rel_err(&noisy, &t[&format!("{name}.add_noise")]) < TOL,
            "{name} add_noise"
        );
        let v = s.velocity(&t["x0"], &t["noise"], &t["t"]).unwrap();
        assert!(
            rel_err(&v, &t[&format!("{name}.velocity")]) < TOL,
            "{name} velocity"
        );
        let target = s.training_target(&t["x0"], &t["noise"], &t["t"]).unwrap();
        let want = if name == "v_trailing" {
            &t[&format!("{name}.velocity")]
        } else {
            &t["noise"]
        };
        assert!(rel_err(&target, want) < TOL);
    }
}

#[test]
fn sampling_trajectories_match_diffusers_step_by_step() {
    let t: HashMap<String, Tensor> = load("schedulers/schedulers.safetensors");
    let cases = configs()["cases"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 18);
    for case in cases {
        let key = case.as_str().unwrap();
        let parts: Vec<&str> = key.split('.').collect();
        let (cname, k, steps) = (parts[0], parts[1], parts[2].parse::<usize>().unwrap());
        let s = Scheduler::new(kind(k), &config(cname), steps).unwrap();
        let want_ts: Vec<f32> = t[&format!("{key}.timesteps")].to_vec1().unwrap();
        let ours_ts: Vec<f32> = s.timesteps().iter().map(|&x| x as f32).collect();
        assert_eq!(ours_ts, want_ts, "{key} timesteps");
        let sigma = t[&format!("{key}.init_noise_sigma")]
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            (s.init_noise_sigma() as f32 - sigma).abs() <= 1e-5 * sigma,
            "{key} init sigma"
        );
        let mut sample = t[&format!("{key}.init")].clone();
        for i in 0..steps {
            let model_in = s.scale_model_input(&sample, i).unwrap();
            let e = rel_err(&model_in, &t[&format!("{key}.model_in")].get(i).unwrap());
            assert!(e < TOL, "{key} step {i} model input: {e}");
            let out = t[&format!("{key}.model_out")].get(i).unwrap();
            let noise = t[&format!("{key}.step_noise")].get(i).unwrap();
            sample = s.step(&out, i, &sample, Some(&noise)).unwrap();
            let e = rel_err(&sample, &t[&format!("{key}.prev")].get(i).unwrap());
            assert!(e < TOL, "{key} step {i}: {e}");
        }
    }
}

#[test]
fn bad_scheduler_input_is_rejected() {
    assert!("heun"
        .parse::<SchedulerKind>()
        .unwrap_err()
        .to_string()
        .contains("heun"));
    let s = Scheduler::new(SchedulerKind::Ddpm, &SchedulerConfig::sd_v1_5(), 20).unwrap();
    let x = Tensor::zeros(
        (2, 4, 2, 2),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t = Tensor::new(&[1000u32, 3], &candle_core::Device::Cpu).unwrap();
    assert!(s
        .add_noise(&x, &x, &t)
        .unwrap_err()
        .to_string()
        .contains("1000"));
    assert!(s
        .step(&x, 0, &x, None)
        .unwrap_err()
        .to_string()
        .contains("noise"));
    assert!(Scheduler::new(SchedulerKind::Ddim, &SchedulerConfig::sd_v1_5(), 0).is_err());
    let mut c = SchedulerConfig::sd_v1_5();
    c.prediction_type = "sample".into();
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("prediction_type"));
}
