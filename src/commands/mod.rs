//! The `sd-lora` subcommands, one module per family. Each is a typed `clap::Args` struct
//! (defaults taken from the library's configs, so `--help` shows them) and a function over it
//! that returns what the command prints; notebooks and tests call the same functions. The
//! binary (`src/bin/sd-lora.rs`) only parses and prints. This is the top layer: nothing else in
//! the crate imports it.

pub mod args;
pub mod bench;
pub mod convert;
pub mod convert_model;
pub mod data;
pub mod demo;
pub mod estimate;
pub mod forward;
pub mod generate;
pub mod inspect;
pub mod plot;
pub mod pretrain;
pub mod train;
pub mod train_dreambooth;
pub mod train_outputs;

use clap::{Parser, Subcommand};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "sd-lora",
    version,
    about = "LoRA fine-tuning of Stable Diffusion in Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Injects LoRA into a UNet (built from its config only, no weights) and prints the summary.
    InspectModel(inspect::InspectModelArgs),
    /// Runs a diffusers-layout UNet on tensors from a safetensors file.
    UnetForward(forward::UnetForwardArgs),
    /// Generates images with a Stable Diffusion pipeline (optionally with LoRA files).
    Generate(generate::GenerateArgs),
    /// Trains a LoRA on an image folder.
    Train(Box<train::TrainArgs>),
    /// Describes a LoRA file: format, layers, rank, alpha, targets, parameters, metadata.
    InspectLora(inspect::InspectLoraArgs),
    /// Converts a LoRA file between formats (kohya <-> peft/diffusers).
    Convert(convert::ConvertArgs),
    /// Writes a single-file checkpoint (A1111/LDM .safetensors) as a diffusers folder.
    ConvertModel(convert_model::ConvertModelArgs),
    /// Writes synthetic captioned 64x64 scenes (PNG + .txt sidecar) in the base or anime look.
    MakeData(data::MakeDataArgs),
    /// Pre-trains the embedded tiny Stable Diffusion (VAE, then UNet), resumable; writes a
    /// diffusers folder.
    PretrainTiny(pretrain::PretrainArgs),
    /// The tutorial's whole flow on the embedded tiny model (CPU, a few minutes): base samples,
    /// LoRA fine-tune on anime-look scenes, loss curve, before/after grid, summary.json.
    Demo(demo::DemoArgs),
    /// Draws loss curves from run folders (metrics.csv): one run with LR and epochs, or several
    /// overlaid.
    Plot(plot::PlotArgs),
    /// Times a LoRA training step (`train`), a 20-step generation (`generate`) or applying a
    /// LoRA file (`lora-load`).
    Bench(bench::BenchArgs),
    /// Predicts the peak memory of `train` with the same flags, broken down; with --vram, the
    /// largest batch that fits and the flags that would make it fit.
    EstimateMemory(estimate::EstimateArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks, and the CLI promises: every flag has help text, every
    /// closed set lists its values.
    #[test]
    fn every_flag_has_help_and_closed_sets_list_their_values() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut checked = 0;
        for sub in cli.get_subcommands() {
            assert!(
                sub.get_about().is_some(),
                "{} has no description",
                sub.get_name()
            );
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{} --{id} has no help text",
                    sub.get_name()
                );
                checked += 1;
            }
        }
        assert!(checked > 80, "only {checked} flags seen");
        let mut cli = Cli::command();
        let train = cli.find_subcommand_mut("train").expect("train");
        let short = train.render_help().to_string();
        let long = train.render_long_help().to_string();
        for shown in [
            "[possible values: auto, f32, f16, bf16]",
            "[possible values: cosine-epoch, cosine, constant]",
            "[possible values: f32, f16, bf16]",
            "[default: 0.0001]",
            "[default: 16]",
        ] {
            assert!(short.contains(shown), "train -h lacks `{shown}`:\n{short}");
        }
        for shown in [
            "Possible values:",
            "- cosine-epoch: The tutorial's",
            "[default: 0.0001]",
        ] {
            assert!(
                long.contains(shown),
                "train --help lacks `{shown}`:\n{long}"
            );
        }
    }

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sd-lora").chain(args.split_whitespace()))
    }

    /// Out-of-range numbers are refused by the parser with the allowed range.
    #[test]
    fn bad_numbers_are_refused_with_the_range() {
        for (args, needle) in [
            (
                "train --data d --out o --lr -1",
                "learning rate must be a number > 0",
            ),
            ("train --data d --out o --rank 0", "at least 1"),
            ("train --data d --out o --caption-dropout 1", "[0, 1)"),
            ("generate --prompt p --out o --scheduler euler", "euler-a"),
            ("generate --prompt p --out o --lora-scale inf", "finite"),
            ("bench train --device tpu", "cpu, cuda, cuda:N or auto"),
            ("train --data d --out o --sample-prompt p", "--sample-every"),
        ] {
            let e = parse(args).expect_err(args).to_string();
            assert!(e.contains(needle), "{args}: {e}");
        }
        // negative strengths are numbers, not flags
        parse("generate --prompt p --out o --lora x --lora-scale -0.5").unwrap();
    }

    /// A flag a command cannot use is an error, not silently dropped.
    #[test]
    fn bench_train_refuses_a_variant() {
        let Command::Bench(a) = parse("bench train --variant fp16").unwrap().command else {
            panic!("not bench");
        };
        let e = bench::bench(&a).unwrap_err().to_string();
        assert!(
            e.contains("--variant fp16") && e.contains("random weights"),
            "{e}"
        );
    }

    /// Old spellings keep working.
    #[test]
    fn old_spellings_parse() {
        for args in [
            "generate --prompt p --out o --scheduler euler_a --dtype fp32",
            "convert x --to diffusers --out y --save-dtype fp16",
            "make-data --style photo --out d",
            "bench generate --device cuda:1",
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args}: {e}"));
        }
    }
}
