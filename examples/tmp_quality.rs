use sd_lora::prelude::*;
use sd_lora::tiny::demo::colour_match;
fn main() -> Result<()> {
    let dir = std::env::args().nth(1).unwrap();
    let sd =
        StableDiffusion::from_folder(std::path::Path::new(&dir), None, DType::F32, &Device::Cpu)?;
    let prompts: Vec<String> = scenes(60, 123).iter().map(|s| s.caption()).collect();
    for g in [1.0, 3.0, 5.0, 7.5] {
        let mut imgs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let cfg = GenerateConfig {
                prompt: p.clone(),
                steps: 20,
                seed: i as u64,
                width: 64,
                height: 64,
                guidance: g,
                ..Default::default()
            };
            imgs.extend(sd.generate(&cfg)?.images);
        }
        println!(
            "guidance {g}: colour match {:.0}%",
            100.0 * colour_match(&imgs, &prompts)
        );
    }
    Ok(())
}
