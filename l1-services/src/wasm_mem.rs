//! Linear memories on 2 MiB transparent huge pages (an experiment of issue #21 item 4).
//!
//! Under PVM every world switch flushes the TLB, so each page a synchronous Wasm event touches
//! after a guest exit costs a page walk. A linear memory whose touched part lies in one 2 MiB
//! page costs one walk instead of one per 4 KiB page (shadow stack, globals, heap). wasmtime's
//! pooling allocator maps its memories itself, so this creator is used with the on-demand
//! allocator (`SPANVMM_WASM_ALLOC=thp`, see `WasmRuntime::new`).
//!
//! The kernel backs a 2 MiB range with a huge page only when all of it is accessible, so the
//! accessible part is rounded up to 2 MiB: beyond the memory's size the bytes exist. That is
//! sound only with explicit bounds checks (`WasmRuntime::new` sets no reservation and no guard
//! for this mode), which compare every access with the current size, not with the mapping.

use std::ptr::NonNull;

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

const HUGE: usize = 2 << 20;

/// Creates linear memories in 2 MiB-aligned reservations advised `MADV_HUGEPAGE`, each
/// reserving room for `reserve` bytes (the memory limit: a memory never moves).
pub(crate) struct HugePageMemories {
    pub reserve: usize,
}

/// One reservation: `[base, base + reserved)` is the memory's room to grow (read-write up to
/// `accessible`, `size` rounded up to 2 MiB), followed by `guard` bytes that stay inaccessible.
struct HugePageMemory {
    map: NonNull<u8>,
    map_len: usize,
    base: NonNull<u8>,
    size: usize,
    accessible: usize,
    reserved: usize,
}

// SAFETY: the memory is plain mapped address space; wasmtime serializes access to it.
unsafe impl Send for HugePageMemory {}
// SAFETY: as above: this type holds no thread-affine state, only addresses.
unsafe impl Sync for HugePageMemory {}

impl Drop for HugePageMemory {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are the mapping made in `new_memory`, unmapped once here.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

// SAFETY: every memory is zero-filled anonymous memory, page aligned, and followed by at least
// `guard_size_in_bytes` of inaccessible address space; it never moves (`byte_capacity` is the
// whole reservation).
unsafe impl MemoryCreator for HugePageMemories {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let reserved = round_up(
            reserved_size_in_bytes
                .unwrap_or(0)
                .max(minimum)
                .max(self.reserve.min(maximum.unwrap_or(usize::MAX))),
            HUGE,
        );
        // Slack to align the base on 2 MiB.
        let map_len = reserved + guard_size_in_bytes + HUGE;
        // SAFETY: a fresh private anonymous reservation with no access; nothing else uses it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(format!(
                "cannot reserve {map_len} bytes for a linear memory: {}",
                std::io::Error::last_os_error()
            ));
        }
        let map = NonNull::new(map.cast::<u8>()).ok_or("mmap returned null")?;
        let offset = round_up(map.as_ptr() as usize, HUGE) - map.as_ptr() as usize;
        // SAFETY: `offset < HUGE`, inside the mapping.
        let base = unsafe { NonNull::new_unchecked(map.as_ptr().add(offset)) };
        let mut mem = HugePageMemory {
            map,
            map_len,
            base,
            size: 0,
            accessible: 0,
            reserved,
        };
        // SAFETY: `[base, base + reserved)` lies inside the mapping. Advice only: a kernel
        // without THP ignores it and the memory works on 4 KiB pages.
        unsafe { libc::madvise(base.as_ptr().cast(), reserved, libc::MADV_HUGEPAGE) };
        mem.grow_to(minimum).map_err(|e| format!("{e:#}"))?;
        Ok(Box::new(mem))
    }
}

// SAFETY: see the MemoryCreator impl: the accessible part is `[base, base + size)`, `size` only
// grows, within the reservation that never moves.
unsafe impl LinearMemory for HugePageMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.reserved
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.reserved {
            wasmtime::bail!(
                "cannot grow a linear memory to {new_size} bytes: {} reserved",
                self.reserved
            );
        }
        if new_size > self.accessible {
            // Whole 2 MiB pages (see the module's comment).
            let len = round_up(new_size, HUGE);
            // SAFETY: `[base, base + len)` lies inside the reservation (`len <= reserved`,
            // which is a multiple of 2 MiB).
            if unsafe {
                libc::mprotect(
                    self.base.as_ptr().cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            } != 0
            {
                return Err(std::io::Error::last_os_error().into());
            }
            self.accessible = len;
        }
        self.size = self.size.max(new_size);
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
}
