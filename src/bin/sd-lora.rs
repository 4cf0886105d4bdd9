//! The `sd-lora` command line: parses (clap, `sd_lora::commands::Cli`) and prints what the
//! library's commands return. No logic of its own.

use anyhow::{Context, Result};
use clap::Parser;

use sd_lora::commands::{self, Cli, Command};

fn main() {
    sd_lora::device::tune_cpu_allocator();
    sd_lora::device::tune_cpu_threads();
    if let Err(e) = run(Cli::parse().command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::InspectModel(a) => println!("{}", commands::inspect::inspect_model(&a)?),
        Command::InspectLora(a) => print!("{}", commands::inspect::inspect_lora(&a)?),
        Command::UnetForward(a) => {
            let report = commands::forward::unet_forward(&a)
                .with_context(|| format!("unet-forward on {}", a.model.model))?;
            eprintln!("{report}");
        }
        Command::Generate(a) => {
            for p in commands::generate::generate(&a)? {
                println!("{}", p.display());
            }
        }
        Command::Train(a) => println!("{}", commands::train::train(&a.options()?)?),
        Command::Convert(a) => println!("{}", commands::convert::convert(&a)?),
        Command::ConvertModel(a) => println!("{}", commands::convert_model::convert_model(&a)?),
        Command::MakeData(a) => println!("{}", commands::data::make_data(&a)?),
        Command::PretrainTiny(a) => {
            let bpe = sd_lora::text::default_clip_bpe();
            let log = &mut sd_lora::train::progress::to_stderr;
            let dir = commands::pretrain::pretrain_tiny(&a.config(), &bpe, log)?;
            println!("wrote {}", dir.display());
        }
        Command::Demo(a) => {
            let cfg = a.config();
            let log = &mut sd_lora::train::progress::to_stderr;
            let s = commands::demo::run_demo(&cfg, log)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            println!(
                "wrote {}: before_after.png, loss.svg, loss.png, lora.safetensors, lora_peft.safetensors, summary.json",
                cfg.out.display()
            );
        }
        Command::EstimateMemory(a) => println!("{}", commands::estimate::estimate_memory(&a)?),
        Command::Plot(a) => println!("{}", commands::plot::plot_runs(&a)?),
        Command::Bench(a) => {
            let report = commands::bench::bench(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
        }
    }
    Ok(())
}
