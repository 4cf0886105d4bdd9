//! Where the work runs: `--device cpu|cuda|cuda:N|auto` and the dtype that suits it.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// A device as named on the command line: parsed at once, opened when the work starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// `cuda` (= `cuda:0`) or `cuda:N`.
    Cuda(usize),
    /// The first CUDA GPU when this build has CUDA support and one is present, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "cpu" => Self::Cpu,
            "auto" => Self::Auto,
            "cuda" => Self::Cuda(0),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Self::Cuda)
                .with_context(|| format!("unknown device `{other}` (cpu, cuda, cuda:N or auto)"))?,
        })
    }
}

impl DeviceSpec {
    /// Opens the device; a CUDA device in a build without CUDA support is a clear error.
    pub fn open(self) -> Result<Device> {
        let ordinal = match self {
            Self::Cpu => return Ok(Device::Cpu),
            Self::Auto => return Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
            Self::Cuda(n) => n,
        };
        if !candle_core::utils::cuda_is_available() {
            bail!(
                "device `cuda:{ordinal}`: this build of sd-lora has no CUDA support; rebuild with \
                 `cargo build --release --features cuda` (see environment.md)"
            );
        }
        Device::new_cuda(ordinal)
            .with_context(|| format!("device `cuda:{ordinal}`: cannot open CUDA GPU {ordinal}"))
    }
}

/// `cpu`; `cuda` (= `cuda:0`) or `cuda:N`; `auto` = the first CUDA GPU when this build has CUDA
/// support and one is present, else the CPU.
pub fn parse_device(s: &str) -> Result<Device> {
    s.parse::<DeviceSpec>()?.open()
}

/// The compute dtype for frozen weights and activations when none is asked for: f32 on the CPU
/// (candle has no fast half-precision matmul there), bf16 on GPUs (the range of f32, so no loss
/// scaling; the VAE too stays finite). LoRA weights, optimizer state and the loss are f32
/// everywhere.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// `--dtype`: a compute precision, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputeDType {
    /// f32 on the CPU, bf16 on GPUs.
    Auto,
    #[value(alias = "fp32")]
    F32,
    #[value(alias = "fp16")]
    F16,
    /// GPU only (candle has no bf16 matmul on the CPU).
    Bf16,
}

impl ComputeDType {
    /// The dtype on `device` (`auto` = [`default_dtype`]); bf16 is refused on the CPU.
    pub fn resolve(self, device: &Device) -> Result<DType> {
        let dtype = match self {
            Self::Auto => default_dtype(device),
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        };
        if dtype == DType::BF16 && device.is_cpu() {
            bail!("bf16 compute is not available on the CPU (candle has no bf16 matmul there): use f32 or f16");
        }
        Ok(dtype)
    }
}

/// Parses a dtype name (`auto`, `f32`/`fp32`, `f16`/`fp16`, `bf16`) for `device`.
pub fn parse_dtype_for(s: &str, device: &Device) -> Result<DType> {
    let c = <ComputeDType as clap::ValueEnum>::from_str(s, false)
        .map_err(|_| anyhow::anyhow!("unknown dtype `{s}` (auto, f32, f16 or bf16)"))?;
    c.resolve(device)
}

/// Waits for queued GPU work (timings); nothing on the CPU.
pub fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// GPU memory in use (the whole device: total - free) in MiB; `None` on the CPU. candle's CUDA
/// allocations come from a stream-ordered pool that keeps freed blocks, so after a step this
/// is close to the step's peak.
pub fn gpu_memory_used_mib(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let _ = d.cuda_stream().context().bind_to_thread();
        if let Ok((free, total)) = result::mem_get_info() {
            return Some((total - free) as f64 / (1024.0 * 1024.0));
        }
    }
    let _ = device;
    None
}

/// Fixes the CPU thread count for this process, once (later calls return the same value):
/// sets `RAYON_NUM_THREADS` to candle's own default when it is unset, and returns the count.
///
/// candle asks for its thread count before every matrix product, and with neither
/// `RAYON_NUM_THREADS` nor `CANDLE_NUM_THREADS` set, each ask counts the physical cores by
/// reading and parsing `/proc/cpuinfo` (the `num_cpus` crate): ~1,400 opens per tiny training
/// step under `strace`, 5-8% of that step (BENCHMARKS.md). With the variable set, the ask
/// parses a number. The count is exactly what candle would have used, so nothing else changes;
/// a value the user set is kept. Call it before tensor work starts (the CLI does so first thing,
/// CPU pipelines when they load): it changes the process environment.
pub fn tune_cpu_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        let n = candle_core::utils::get_num_threads();
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        n
    })
}

/// Settles glibc's allocator for tensor work on the CPU, once per process (later calls do
/// nothing); returns whether it changed anything.
///
/// Every candle op allocates its output. glibc serves blocks above its mmap threshold (dynamic,
/// 128 KiB to 32 MiB) with fresh `mmap`s that the kernel must fault in and zero page by page,
/// and unmaps them on free, so a training step that makes thousands of multi-MiB tensors spent
/// ~20% of its time in page faults (perf). With the threshold at 1 GiB and the trim threshold
/// at 2 GiB (glibc takes an int), freed blocks go back to the heap and are reused: the tiny
/// training step ran ~25% faster (BENCHMARKS.md). The cost is memory the heap keeps after a peak (returned by
/// [`reset_peak_rss`] or at exit). Set `SD_LORA_MALLOC_TUNING=0` to keep glibc's
/// defaults. Other platforms and allocators: a no-op.
pub fn tune_cpu_allocator() -> bool {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        if std::env::var("SD_LORA_MALLOC_TUNING").is_ok_and(|v| v == "0") {
            return false;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes allocator parameters; it takes no pointers.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
            }
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        {
            false
        }
    })
}

/// The process's peak resident set size in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak resident set size (`VmHWM`) to the current one (Linux: writes 5 to
/// `/proc/self/clear_refs`), so that [`peak_rss_mib`] measures the peak of what runs next.
/// First hands freed heap memory back to the system (glibc `malloc_trim`): otherwise memory
/// that an earlier run freed but the allocator kept would count towards the next run's peak.
/// Returns false where the kernel does not allow the reset.
pub fn reset_peak_rss() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free memory; it takes no pointers.
        unsafe {
            malloc_trim(0);
        }
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
