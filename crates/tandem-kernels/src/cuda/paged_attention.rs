//! CUDA launches of the paged attention and cache write kernels (kernels/paged_attention.cu).
//!
//! A batch's metadata goes to the device once per forward, not once per layer: the first call
//! with a `PagedAttentionMeta` uploads it (one copy for positions, block tables and slots, one for
//! the work list) and keeps it in the meta for the other layers. Where a batch has too few work
//! items to fill the GPU, each item's keys are split over several blocks and a second launch
//! merges the partial states (`key_splits`).

use super::contiguous;
use crate::key_splits::{key_splits, max_tiles};
use crate::paged_attention::{check_shapes, check_write, work_list, PagedAttentionMeta, MAX_ROWS};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, Layout, Result, Shape};
use std::sync::OnceLock;

pub const PAGED_ATTENTION_PTX: &str =
    include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "tandem_paged_attention";

/// Positions, block tables (flattened, with offsets) and slots of a batch, in one device buffer:
/// `positions [T] | table_off [S + 1] | tables [..] | slots [T]`.
pub(crate) struct BasePlan {
    device: CudaDevice,
    buf: CudaSlice<i32>,
    tokens: usize,
    segments: usize,
}

impl BasePlan {
    fn new(dev: &CudaDevice, meta: &PagedAttentionMeta) -> Result<Self> {
        let tokens = meta.positions.len();
        let segments = meta.block_tables.len();
        let tables_len: usize = meta.block_tables.iter().map(Vec::len).sum();
        let mut host = Vec::with_capacity(2 * tokens + segments + 1 + tables_len);
        host.extend(meta.positions.iter().map(|&p| p as i32));
        let mut off = 0i32;
        host.push(0);
        for t in &meta.block_tables {
            off += t.len() as i32;
            host.push(off);
        }
        for t in &meta.block_tables {
            host.extend(t.iter().map(|&b| b as i32));
        }
        host.extend(meta.slots().into_iter().map(|s| s as i32));
        Ok(Self {
            device: dev.clone(),
            buf: dev.clone_htod(&host)?,
            tokens,
            segments,
        })
    }

    fn positions(&self) -> CudaView<'_, i32> {
        self.buf.slice(0..self.tokens)
    }

    fn table_off(&self) -> CudaView<'_, i32> {
        self.buf.slice(self.tokens..self.tokens + self.segments + 1)
    }

    fn tables(&self) -> CudaView<'_, i32> {
        self.buf
            .slice(self.tokens + self.segments + 1..self.buf.len() - self.tokens)
    }

    fn slots(&self) -> CudaView<'_, i32> {
        self.buf.slice(self.buf.len() - self.tokens..)
    }
}

/// The work list for one GQA group size: four ints per item (see kernels/paged_attention.cu).
pub(crate) struct WorkPlan {
    device: CudaDevice,
    group: usize,
    buf: CudaSlice<i32>,
    items: usize,
    max_rows: usize,
    /// The most key tiles an item walks.
    max_tiles: usize,
}

impl WorkPlan {
    fn new(dev: &CudaDevice, meta: &PagedAttentionMeta, group: usize) -> Result<Self> {
        let items = work_list(&meta.token_segment, group);
        let mut host = Vec::with_capacity(4 * items.len());
        for it in &items {
            host.extend([
                it.segment as i32,
                it.first_token as i32,
                it.tokens as i32,
                (it.first_head | (it.heads << 16)) as i32,
            ]);
        }
        Ok(Self {
            device: dev.clone(),
            group,
            buf: dev.clone_htod(&host)?,
            items: items.len(),
            max_rows: items.iter().map(|i| i.rows()).max().unwrap_or(1),
            max_tiles: max_tiles(meta, &items),
        })
    }
}

/// The device copies a `PagedAttentionMeta` keeps once made.
#[derive(Default)]
pub(crate) struct AttentionPlans {
    base: OnceLock<BasePlan>,
    work: OnceLock<WorkPlan>,
}

/// The plan in `cell` if `fits`, else a fresh one from `make` (kept in `cell` when it was empty,
/// else in `fresh` for this call only).
fn cached<'a, P>(
    cell: &'a OnceLock<P>,
    fresh: &'a mut Option<P>,
    fits: impl Fn(&P) -> bool,
    make: impl FnOnce() -> Result<P>,
) -> Result<&'a P> {
    if let Some(p) = cell.get().filter(|p| fits(p)) {
        return Ok(p);
    }
    match cell.set(make()?) {
        Ok(()) => Ok(cell.get().expect("just set")),
        Err(p) => Ok(fresh.insert(p)),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch<T: DeviceRepr>(
    suffix: &str,
    dev: &CudaDevice,
    (base, work): (&BasePlan, &WorkPlan),
    (q, k, v): (&CudaSlice<T>, &CudaSlice<T>, &CudaSlice<T>),
    (ql, kl, vl): (&Layout, &Layout, &Layout),
    (t, nh, nkv, hd): (usize, usize, usize, usize),
    meta: &PagedAttentionMeta,
    scale: f32,
) -> Result<CudaSlice<T>> {
    let q = contiguous(q, ql, "paged_attention", "q")?;
    let k = contiguous(k, kl, "paged_attention", "k cache")?;
    let v = contiguous(v, vl, "paged_attention", "v cache")?;
    // The kernel stages the caches 16 bytes per load: their rows (hd elements, hd % 32 == 0)
    // are then 16-byte aligned if the views start on a 16-byte boundary (allocations do).
    for (l, what) in [(kl, "k cache"), (vl, "v cache")] {
        let start = l.start_offset() * std::mem::size_of::<T>();
        if !start.is_multiple_of(16) {
            candle_core::bail!(
                "paged_attention: the {what} view must start on a 16-byte boundary (byte {start})"
            )
        }
    }
    let splits = key_splits(work.items * nkv, work.max_tiles, sm_count(dev)?);
    // SAFETY: the work items cover every (token, head) row once and the kernel (or, with
    // splits, the merge) writes all of them.
    let out = unsafe { dev.alloc::<T>(t * nh * hd)? };
    // Partial states with splits: acc [rows, splits, hd] then (m, l) [rows, splits, 2], f32.
    let rows = t * nh;
    let part = if splits > 1 {
        // SAFETY: block z of every item writes the partial state of each of its rows for split z.
        Some(unsafe { dev.alloc::<f32>(rows * splits * (hd + 2))? })
    } else {
        None
    };
    let f = dev.get_or_load_custom_func(
        &format!("paged_attention_{suffix}_d{hd}"),
        MODULE,
        PAGED_ATTENTION_PTX,
    )?;
    let (nh_i, nkv_i, bs_i) = (nh as i32, nkv as i32, meta.block_size as i32);
    let window = meta
        .sliding_window
        .map_or(0, |w| w.min(i32::MAX as usize) as i32);
    let (positions, table_off, tables) = (base.positions(), base.table_off(), base.tables());
    let null = 0u64;
    let (acc, ml) = match &part {
        Some(p) => (
            Some(p.slice(..rows * splits * hd)),
            Some(p.slice(rows * splits * hd..)),
        ),
        None => (None, None),
    };
    let mut b = f.builder();
    b.arg(&q)
        .arg(&k)
        .arg(&v)
        .arg(&out)
        .arg(&work.buf)
        .arg(&positions)
        .arg(&table_off)
        .arg(&tables)
        .arg(&nh_i)
        .arg(&nkv_i)
        .arg(&bs_i)
        .arg(&window)
        .arg(&scale);
    // The partial-state pointers are null without splits (the kernel writes `out` then).
    match (&acc, &ml) {
        (Some(a), Some(m)) => b.arg(a).arg(m),
        _ => b.arg(&null).arg(&null),
    };
    let cfg = LaunchConfig {
        grid_dim: (work.items as u32, nkv as u32, splits as u32),
        block_dim: (32 * work.max_rows as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: shapes checked (check_shapes): q [t, nh, hd], caches [slots, nkv, hd] with every
    // block a token needs inside them (validate); the plans were built from this meta on this
    // device; hd is one the PTX has a kernel for (paged_attention_supported); with splits the
    // partial buffers hold rows * splits states.
    unsafe { b.launch(cfg) }.w()?;
    if let (Some(acc), Some(ml)) = (&acc, &ml) {
        let f = dev.get_or_load_custom_func(
            &format!("paged_attention_combine_{suffix}_d{hd}"),
            MODULE,
            PAGED_ATTENTION_PTX,
        )?;
        let (rows_i, splits_i) = (rows as i32, splits as i32);
        let mut b = f.builder();
        b.arg(&out).arg(acc).arg(ml).arg(&rows_i).arg(&splits_i);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the first launch wrote every row's `splits` partial states; out is [rows, hd].
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(out)
}

/// The device's multiprocessor count (asked once; one process drives one GPU).
fn sm_count(dev: &CudaDevice) -> Result<usize> {
    static SMS: OnceLock<usize> = OnceLock::new();
    if let Some(&n) = SMS.get() {
        return Ok(n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(*SMS.get_or_init(|| n.max(1) as usize))
}

fn plans<'a>(
    meta: &'a PagedAttentionMeta,
    dev: &CudaDevice,
    group: Option<usize>,
    fresh: &'a mut (Option<BasePlan>, Option<WorkPlan>),
) -> Result<(&'a BasePlan, Option<&'a WorkPlan>)> {
    let base = cached(
        &meta.cuda.base,
        &mut fresh.0,
        |p| p.device.same_device(dev),
        || BasePlan::new(dev, meta),
    )?;
    let work = match group {
        Some(group) => Some(cached(
            &meta.cuda.work,
            &mut fresh.1,
            |p| p.device.same_device(dev) && p.group == group,
            || WorkPlan::new(dev, meta, group),
        )?),
        None => None,
    };
    Ok((base, work))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_attention_fwd(
    meta: &PagedAttentionMeta,
    scale: f32,
    qs: &CudaStorage,
    ql: &Layout,
    ks: &CudaStorage,
    kl: &Layout,
    vs: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (t, nh, nkv, hd) = check_shapes(meta, ql, kl, vl)?;
    if !hd.is_multiple_of(32) || hd > 128 {
        candle_core::bail!("paged_attention: cuda supports head_dim 32, 64, 96, 128, got {hd}")
    }
    const { assert!(MAX_ROWS * 32 <= 1024) };
    let dev = qs.device();
    let mut fresh = (None, None);
    let (base, work) = plans(meta, dev, Some(nh / nkv), &mut fresh)?;
    let work = work.expect("asked for");
    let shape = (t, nh, nkv, hd);
    // The same launch for each element type.
    macro_rules! launch_as {
        ($variant:ident, $suffix:literal, $q:ident, $k:ident, $v:ident) => {
            CudaStorageSlice::$variant(launch(
                $suffix,
                dev,
                (base, work),
                ($q, $k, $v),
                (ql, kl, vl),
                shape,
                meta,
                scale,
            )?)
        };
    }
    let slice = match (&qs.slice, &ks.slice, &vs.slice) {
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            launch_as!(F32, "f32", q, k, v)
        }
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            launch_as!(BF16, "bf16", q, k, v)
        }
        _ => candle_core::bail!(
            "paged_attention: cuda supports f32 and bf16 (q and caches alike), got {:?}",
            qs.dtype()
        ),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((t, nh, hd)),
    ))
}

fn write<T: DeviceRepr>(
    suffix: &str,
    dev: &CudaDevice,
    base: &BasePlan,
    (cache, cl): (&mut CudaSlice<T>, &Layout),
    (src, sl): (&CudaSlice<T>, &Layout),
    (t, row): (usize, usize),
) -> Result<()> {
    let (a, b) = cl.contiguous_offsets().expect("checked by check_write");
    let mut cache = cache.slice_mut(a..b);
    let src = contiguous(src, sl, "write_kv", "values")?;
    let slots = base.slots();
    let f =
        dev.get_or_load_custom_func(&format!("write_kv_{suffix}"), MODULE, PAGED_ATTENTION_PTX)?;
    let row_i = row as i32;
    let mut bld = f.builder();
    bld.arg(&mut cache).arg(&src).arg(&slots).arg(&row_i);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (row.clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: check_write: the cache holds every slot of the meta (validate), src is [t, row].
    unsafe { bld.launch(cfg) }.w()?;
    Ok(())
}

pub(crate) fn write_kv_fwd(
    meta: &PagedAttentionMeta,
    cs: &mut CudaStorage,
    cl: &Layout,
    ss: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    let dims = check_write(meta, cl, sl)?;
    let dev = cs.device().clone();
    let mut fresh = (None, None);
    let (base, _) = plans(meta, &dev, None, &mut fresh)?;
    match (&mut cs.slice, &ss.slice) {
        (CudaStorageSlice::F32(c), CudaStorageSlice::F32(s)) => {
            write("f32", &dev, base, (c, cl), (s, sl), dims)
        }
        (CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(s)) => {
            write("bf16", &dev, base, (c, cl), (s, sl), dims)
        }
        _ => candle_core::bail!(
            "write_kv: cuda supports f32 and bf16 (cache and values alike), got {:?}",
            ss.dtype()
        ),
    }
}
