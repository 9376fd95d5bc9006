//! Loading a kernel into guest memory and describing how the boot vCPU starts.
//!
//! Three entries: PVH (32-bit protected mode, `hvm_start_info`), spanguest's direct 64-bit CPL3
//! entry (skips the emulated CPL0 set-up, see docs/spanguest-abi.md), and Linux bzImage through
//! the 32-bit boot protocol (`boot_params`, E820) for hosts with hardware virtualization.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::KernelLoader;
use serde::{Deserialize, Serialize};
use vm_memory::{ByteValued, GuestAddress};

use crate::memory::{GuestRam, MemoryError};

/// Boot GDT (flat 32-bit segments for the PVH and Linux 32-bit entries).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// `hvm_start_info`, followed by its memory map.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (including the NUL).
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel is loaded: the conventional 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory below 1 MiB (EBDA starts here).
const LOW_RAM_END: u64 = 0x9fc00;
/// The PCI hole Linux expects below 4 GiB.
const PCI_HOLE: (u64, u64) = (0xc000_0000, 0x1_0000_0000);
const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Name and type of spanguest's direct-entry ELF note.
const SPANGUEST_NOTE: (&str, u32) = ("SPANGUEST", 1);
/// Largest kernel file we read whole to look for notes.
const MAX_KERNEL_BYTES: u64 = 256 << 20;

/// Boot errors.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {err}")]
    Read {
        /// Kernel path.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The file is neither a bootable ELF nor a bzImage.
    #[error("{0}")]
    Format(String),
    /// The command line is too long or has a NUL.
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// How the boot vCPU (and, for the direct entry, every vCPU) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = start_info.
    Pvh {
        /// 32-bit entry point.
        entry: u64,
        /// GPA of `hvm_start_info`.
        start_info: u64,
    },
    /// spanguest's direct 64-bit CPL3 entry.
    Direct {
        /// 64-bit CPL3 entry.
        user_entry: u64,
        /// Guest PML4.
        pml4: u64,
        /// Guest GDT base.
        gdt_base: u64,
        /// Guest GDT limit.
        gdt_limit: u16,
        /// Guest TSS base.
        tss_base: u64,
        /// Guest TSS limit: it covers the I/O permission bitmap that lets CPL3 do port I/O.
        tss_limit: u32,
        /// GPA of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 32-bit boot protocol: ESI = boot_params.
    Linux {
        /// `code32_start`.
        entry: u64,
        /// GPA of the zero page.
        boot_params: u64,
    },
}

/// Which entry the caller prefers for an ELF that offers both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPreference {
    /// Enter spanguest straight at CPL3 when its note is present (fast on PVM).
    Direct,
    /// Always use the PVH entry (as QEMU does).
    Pvh,
}

/// spanguest's direct-entry note contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectEntryNote {
    /// ABI version.
    pub version: u64,
    /// 64-bit CPL3 entry.
    pub user_entry: u64,
    /// Static PML4.
    pub pml4: u64,
    /// GDT base.
    pub gdt_base: u64,
    /// GDT limit.
    pub gdt_limit: u64,
    /// TSS base.
    pub tss_base: u64,
    /// Bytes identity-mapped by the static tables.
    pub mapped_bytes: u64,
}

/// The guest's memory map: RAM below 640 KiB and from 1 MiB up; with `pci_hole`, the range
/// [3 GiB, 4 GiB) is left out (Linux expects devices there).
pub fn memory_map(mem_size: u64, pci_hole: bool) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, HIMEM_START - LOW_RAM_END, E820_RESERVED),
    ];
    if pci_hole && mem_size > PCI_HOLE.0 {
        map.push((HIMEM_START, PCI_HOLE.0 - HIMEM_START, E820_RAM));
        if mem_size > PCI_HOLE.1 {
            map.push((PCI_HOLE.1, mem_size - PCI_HOLE.1, E820_RAM));
        }
    } else {
        map.push((HIMEM_START, mem_size - HIMEM_START, E820_RAM));
    }
    map
}

/// The command line the guest is given: the user's words, then one
/// `virtio_mmio.device=SIZE@ADDR:GSI` per virtio device in slots `0..virtio_devices`, the words
/// QEMU's microvm writes. Linux's virtio-mmio driver (the same parameter, `<size>@<base>:<irq>`)
/// and spanguest find the devices from them: there is no ACPI table or device tree for them.
pub fn kernel_cmdline(user: &str, virtio_devices: usize) -> String {
    if virtio_devices == 0 {
        return user.to_string();
    }
    let words = crate::devices::virtio::cmdline_words(virtio_devices);
    format!("{user} {words}").trim_start().to_string()
}

fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} allowed",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline("it contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.write(CMDLINE_ADDR, &bytes)?;
    Ok(())
}

/// Writes a flat 32-bit boot GDT: 0x10 code, 0x18 data (the Linux boot protocol's selectors).
fn write_boot_gdt(ram: &GuestRam) -> Result<(), BootError> {
    let gdt: [u64; 4] = [0, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(BOOT_GDT_ADDR, &bytes)?;
    Ok(())
}

/// Writes `hvm_start_info` and its memory map; returns its address.
fn write_start_info(ram: &GuestRam) -> Result<u64, BootError> {
    let map = memory_map(ram.size(), false);
    let info_len = std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = START_INFO_ADDR + info_len.next_multiple_of(16);
    let info = hvm_start_info {
        magic: HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    ram.write(START_INFO_ADDR, info.as_slice())?;
    for (i, (addr, size, kind)) in map.into_iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        };
        let at = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        ram.write(at, e.as_slice())?;
    }
    Ok(START_INFO_ADDR)
}

fn open(path: &Path) -> Result<File, BootError> {
    let err = |err| BootError::Read {
        path: path.display().to_string(),
        err,
    };
    let f = File::open(path).map_err(err)?;
    if !f.metadata().map_err(err)?.is_file() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(f)
}

/// Loads the kernel at `path` and writes the boot structures; returns how to start the vCPUs.
pub fn load_kernel(
    ram: &GuestRam,
    path: &Path,
    cmdline: &str,
    initrd: Option<&Path>,
    preference: EntryPreference,
) -> Result<BootEntry, BootError> {
    let mut file = open(path)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|err| BootError::Read {
        path: path.display().to_string(),
        err,
    })?;
    file.seek(SeekFrom::Start(0)).ok();
    write_cmdline(ram, cmdline)?;
    write_boot_gdt(ram)?;
    if n == 4 && &magic == b"\x7fELF" {
        load_elf(ram, path, &mut file, initrd, preference)
    } else {
        load_bzimage(ram, &mut file, cmdline, initrd)
    }
}

fn load_elf(
    ram: &GuestRam,
    path: &Path,
    file: &mut File,
    initrd: Option<&Path>,
    preference: EntryPreference,
) -> Result<BootEntry, BootError> {
    if initrd.is_some() {
        return Err(BootError::Format(
            "an initrd goes with a bzImage kernel, not an ELF".into(),
        ));
    }
    let loaded = Elf::load(
        ram.guest_memory(),
        None,
        file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| BootError::Format(format!("{}: not a loadable ELF: {e}", path.display())))?;
    let start_info = write_start_info(ram)?;
    let note = read_direct_note(file)?;
    match (preference, note, loaded.pvh_boot_cap) {
        (EntryPreference::Direct, Some(n), _) => {
            if n.version != 1 {
                return Err(BootError::Format(format!(
                    "spanguest direct-entry ABI version {} is not supported (expected 1)",
                    n.version
                )));
            }
            if n.mapped_bytes < ram.size() {
                return Err(BootError::Format(format!(
                    "the guest maps only {} MiB but has {} MiB of RAM",
                    n.mapped_bytes >> 20,
                    ram.size() >> 20
                )));
            }
            let tss_limit = tss_limit_from_gdt(ram, n.gdt_base, n.tss_base)?;
            Ok(BootEntry::Direct {
                user_entry: n.user_entry,
                pml4: n.pml4,
                gdt_base: n.gdt_base,
                gdt_limit: n.gdt_limit as u16,
                tss_base: n.tss_base,
                tss_limit,
                start_info,
            })
        }
        (_, _, PvhBootCapability::PvhEntryPresent(entry)) => Ok(BootEntry::Pvh {
            entry: entry.0,
            start_info,
        }),
        _ => Err(BootError::Format(format!(
            "{}: the ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): it cannot be booted",
            path.display()
        ))),
    }
}

/// Reads the limit of the TSS descriptor (selector 0x30) from the guest's GDT, as `ltr` would,
/// checking that it describes the TSS the note names.
fn tss_limit_from_gdt(ram: &GuestRam, gdt_base: u64, tss_base: u64) -> Result<u32, BootError> {
    let mut d = [0u8; 16];
    ram.read(gdt_base + 0x30, &mut d)?;
    let lo = u64::from_le_bytes(d[0..8].try_into().unwrap());
    let hi = u64::from_le_bytes(d[8..16].try_into().unwrap());
    let base = (lo >> 16 & 0xff_ffff) | (lo >> 56 & 0xff) << 24 | (hi & 0xffff_ffff) << 32;
    let mut limit = (lo & 0xffff) | (lo >> 48 & 0xf) << 16;
    if lo >> 55 & 1 == 1 {
        limit = limit << 12 | 0xfff; // 4 KiB granularity
    }
    if base != tss_base || lo >> 47 & 1 == 0 {
        return Err(BootError::Format(format!(
            "the guest's GDT entry 0x30 is not the TSS at {tss_base:#x} its note names"
        )));
    }
    Ok(limit as u32)
}

/// Finds spanguest's direct-entry note in an ELF64 file, if any.
fn read_direct_note(file: &mut File) -> Result<Option<DirectEntryNote>, BootError> {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_KERNEL_BYTES {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|err| BootError::Read {
            path: "kernel".into(),
            err,
        })?;
    Ok(
        find_note(&bytes, SPANGUEST_NOTE.0, SPANGUEST_NOTE.1).and_then(|d| {
            let w = |i: usize| {
                d.get(i * 8..i * 8 + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            };
            Some(DirectEntryNote {
                version: w(0)?,
                user_entry: w(1)?,
                pml4: w(2)?,
                gdt_base: w(3)?,
                gdt_limit: w(4)?,
                tss_base: w(5)?,
                mapped_bytes: w(6)?,
            })
        }),
    )
}

/// The descriptor of the first note called `name` with type `kind` in the PT_NOTE segments of an
/// ELF64 little-endian image. Every offset is bounds-checked: a malformed file yields `None`.
pub fn find_note(elf: &[u8], name: &str, kind: u32) -> Option<Vec<u8>> {
    let field = |o: usize, n: usize| elf.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| field(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| field(o, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o: usize| field(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    if elf.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != 4 {
            continue; // not PT_NOTE
        }
        let off = usize::try_from(u64_at(ph.checked_add(8)?)?).ok()?;
        let size = usize::try_from(u64_at(ph.checked_add(32)?)?).ok()?;
        let seg = elf.get(off..off.checked_add(size)?)?;
        let mut p = 0usize;
        while p + 12 <= seg.len() {
            let rd = |o: usize| u32::from_le_bytes(seg[o..o + 4].try_into().unwrap()) as usize;
            let (namesz, descsz, ty) = (rd(p), rd(p + 4), rd(p + 8) as u32);
            let name_start = p + 12;
            let desc_start = name_start.checked_add(namesz.checked_next_multiple_of(4)?)?;
            let next = desc_start.checked_add(descsz.checked_next_multiple_of(4)?)?;
            let note_name = seg.get(name_start..name_start.checked_add(namesz)?)?;
            let note_name = note_name.strip_suffix(&[0]).unwrap_or(note_name);
            if note_name == name.as_bytes() && ty == kind {
                return seg
                    .get(desc_start..desc_start.checked_add(descsz)?)
                    .map(<[u8]>::to_vec);
            }
            p = next;
        }
    }
    None
}

fn load_bzimage(
    ram: &GuestRam,
    file: &mut File,
    cmdline: &str,
    initrd: Option<&Path>,
) -> Result<BootEntry, BootError> {
    let loaded = BzImage::load(
        ram.guest_memory(),
        None,
        file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| BootError::Format(format!("the kernel is neither an ELF nor a bzImage ({e})")))?;
    let mut params = boot_params::default();
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| BootError::Format("bzImage without a setup header".into()))?;
    hdr.type_of_loader = 0xff; // "undefined" boot loader
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    hdr.loadflags |= 0x80; // CAN_USE_HEAP
    hdr.heap_end_ptr = 0xfe00;
    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(ram, initrd, hdr.initrd_addr_max)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    let map = memory_map(ram.size(), true);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Format("too many E820 entries".into()));
    }
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    ram.write(ZERO_PAGE_ADDR, params.as_slice())?;
    Ok(BootEntry::Linux {
        entry: u64::from(hdr.code32_start).max(loaded.kernel_load.0),
        boot_params: ZERO_PAGE_ADDR,
    })
}

/// Places the initrd page-aligned at the top of low RAM, under the kernel's `initrd_addr_max`.
fn load_initrd(ram: &GuestRam, path: &Path, addr_max: u32) -> Result<(u64, u64), BootError> {
    let err = |err| BootError::Read {
        path: path.display().to_string(),
        err,
    };
    let mut f = open(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(err)?;
    let limit = ram
        .size()
        .min(PCI_HOLE.0)
        .min(u64::from(addr_max).max(HIMEM_START) + 1);
    let size = data.len() as u64;
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= 16 << 20)
        .ok_or_else(|| {
            BootError::Format(format!(
                "initrd of {size} bytes does not fit in guest memory"
            ))
        })?;
    ram.write(addr, &data)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("spanvmm-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal but well-formed bzImage: one setup sector after the boot sector, a setup
    /// header that says "HdrS" v2.15 loaded high, then a protected-mode payload.
    fn synthetic_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_boot_params_e820_cmdline_and_initrd() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let kernel = tmp("bz", &synthetic_bzimage(&[0xf4; 1000]));
        let initrd = tmp("initrd", &[0x5a; 5000]);
        let entry = load_kernel(
            &ram,
            &kernel,
            "console=ttyS0 quiet",
            Some(&initrd),
            EntryPreference::Direct,
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux {
                entry: HIMEM_START,
                boot_params: ZERO_PAGE_ADDR
            }
        );
        let mut kb = [0u8; 1000];
        ram.read(HIMEM_START, &mut kb).unwrap();
        assert!(kb.iter().all(|b| *b == 0xf4));
        let mut p = boot_params::default();
        // SAFETY-free: read the zero page back through the byte view.
        ram.read(ZERO_PAGE_ADDR, p.as_mut_slice()).unwrap();
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        let mut cl = [0u8; 20];
        ram.read(CMDLINE_ADDR, &mut cl).unwrap();
        assert_eq!(&cl, b"console=ttyS0 quiet\0");
        let (rd, rs) = ({ p.hdr.ramdisk_image } as u64, { p.hdr.ramdisk_size });
        assert_eq!(rs, 5000);
        assert_eq!(rd % 4096, 0);
        assert!(rd + 5000 <= 64 << 20);
        let mut r = [0u8; 5000];
        ram.read(rd, &mut r).unwrap();
        assert!(r.iter().all(|b| *b == 0x5a));
        assert_eq!(p.e820_entries, 3);
        let top = p.e820_table[2];
        assert_eq!(
            ({ top.addr }, { top.size }, { top.r#type }),
            (HIMEM_START, (64 << 20) - HIMEM_START, 1)
        );
        std::fs::remove_file(kernel).ok();
        std::fs::remove_file(initrd).ok();
    }

    /// Linux's `virtio_mmio.device=` format, read the way drivers/virtio/virtio_mmio.c reads
    /// it (`memparse` size, `@`, `memparse` base, `:`, decimal IRQ): each device's window and
    /// GSI, in slot order, after the user's words; and the line a bzImage is given holds them.
    #[test]
    fn the_kernel_command_line_announces_each_virtio_device() {
        use crate::devices::virtio::{slot_addr, slot_gsi, MMIO_SIZE};
        assert_eq!(kernel_cmdline("console=ttyS0", 0), "console=ttyS0");
        assert_eq!(
            kernel_cmdline("console=ttyS0 root=/dev/vda", 2),
            "console=ttyS0 root=/dev/vda virtio_mmio.device=512@0xfeb00000:5 \
             virtio_mmio.device=512@0xfeb00200:6"
        );
        let line = kernel_cmdline("", 3);
        let memparse = |v: &str| match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => v.parse::<u64>().unwrap(),
        };
        let devices: Vec<(u64, u64, u32)> = line
            .split(' ')
            .map(|w| {
                let v = w.strip_prefix("virtio_mmio.device=").expect(w);
                let (size, rest) = v.split_once('@').unwrap();
                let (base, irq) = rest.split_once(':').unwrap();
                (memparse(size), memparse(base), irq.parse().unwrap())
            })
            .collect();
        let want: Vec<(u64, u64, u32)> = (0..3)
            .map(|i| (MMIO_SIZE, slot_addr(i), slot_gsi(i)))
            .collect();
        assert_eq!(devices, want);
        // The windows are outside the RAM a Linux guest is told of (the hole below 4 GiB).
        let map = memory_map(3 << 30, true);
        for (_, base, _) in &devices {
            assert!(map
                .iter()
                .all(|(a, l, k)| *k != E820_RAM || base + MMIO_SIZE <= *a || *base >= a + l));
        }
        // A bzImage's boot protocol carries the whole line.
        let ram = GuestRam::new(64 << 20).unwrap();
        let kernel = tmp("bz-virtio", &synthetic_bzimage(&[0xf4; 100]));
        let cmdline = kernel_cmdline("console=ttyS0", 2);
        load_kernel(&ram, &kernel, &cmdline, None, EntryPreference::Direct).unwrap();
        let mut got = vec![0u8; cmdline.len() + 1];
        ram.read(CMDLINE_ADDR, &mut got).unwrap();
        assert_eq!(&got[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(got[cmdline.len()], 0);
        let mut params = boot_params::default();
        ram.read(ZERO_PAGE_ADDR, params.as_mut_slice()).unwrap();
        let size = params.hdr.cmdline_size;
        assert_eq!(size as usize, cmdline.len() + 1);
        let _ = std::fs::remove_file(kernel);
    }

    #[test]
    fn pci_hole_only_for_linux_and_only_when_big() {
        assert_eq!(memory_map(1 << 30, true).len(), 3);
        let big = memory_map(6 << 30, true);
        assert_eq!(big[2], (HIMEM_START, PCI_HOLE.0 - HIMEM_START, 1));
        assert_eq!(big[3], (1 << 32, 2 << 30, 1));
        assert_eq!(
            memory_map(6 << 30, false)[2],
            (HIMEM_START, (6 << 30) - HIMEM_START, 1)
        );
    }

    #[test]
    fn garbage_and_missing_kernels_are_clear_errors() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let junk = tmp("junk", b"this is not a kernel at all, just text");
        let e = load_kernel(&ram, &junk, "", None, EntryPreference::Direct).unwrap_err();
        assert!(
            e.to_string().contains("neither an ELF nor a bzImage"),
            "{e}"
        );
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(200, 0);
        let badelf = tmp("badelf", &elf);
        let e = load_kernel(&ram, &badelf, "", None, EntryPreference::Direct).unwrap_err();
        assert!(e.to_string().contains("not a loadable ELF"), "{e}");
        let e = load_kernel(
            &ram,
            Path::new("/nonexistent/k"),
            "",
            None,
            EntryPreference::Direct,
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot read kernel"), "{e}");
        let e = load_kernel(&ram, Path::new("/"), "", None, EntryPreference::Direct).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let long = "x".repeat(CMDLINE_MAX);
        let e = load_kernel(&ram, &junk, &long, None, EntryPreference::Direct).unwrap_err();
        assert!(matches!(e, BootError::Cmdline(_)));
        std::fs::remove_file(junk).ok();
        std::fs::remove_file(badelf).ok();
    }

    #[test]
    fn note_parser_survives_truncation() {
        // An ELF header claiming a program header table far beyond the data.
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(64, 0);
        elf[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(find_note(&elf, "SPANGUEST", 1), None);
        for n in 0..elf.len() {
            assert_eq!(find_note(&elf[..n], "SPANGUEST", 1), None);
        }
    }
}
