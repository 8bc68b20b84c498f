//! Peak device memory for benchmarks, comparable with PyTorch's `max_memory_allocated`.
//!
//! candle allocates CUDA memory through cudarc, which uses stream-ordered allocation
//! (`cuMemAllocAsync`) from the device's current memory pool; the pool's used-memory high-water
//! mark (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`) is then the peak of everything tandem held at once —
//! weights, KV cache, activations, adapters and optimizer state. cuBLAS's workspace comes from
//! elsewhere and is not counted (PyTorch does not count its own either).

use anyhow::Result;
use candle_core::Device;

/// The peak bytes allocated on `dev` since the process started (or the last `reset_peak`);
/// None on the CPU or where the device has no memory pool.
#[cfg(feature = "cuda")]
pub(crate) fn peak_bytes(dev: &Device) -> Result<Option<u64>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cd) = dev else {
        return Ok(None);
    };
    let ctx = cd.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut high: u64 = 0;
    // SAFETY: plain driver queries writing into the locals above; the context is current.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut high as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(Some(high))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn peak_bytes(_: &Device) -> Result<Option<u64>> {
    Ok(None)
}

/// "peak device memory: X GiB" for a benchmark's output, or nothing on the CPU.
pub(crate) fn peak_line(dev: &Device) -> Result<String> {
    Ok(peak_bytes(dev)?.map_or(String::new(), |b| {
        format!(
            "peak device memory (pool high-water mark, weights included): {:.2} GiB",
            b as f64 / (1u64 << 30) as f64
        )
    }))
}
