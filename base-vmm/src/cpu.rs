//! The CPU model a guest sees: the CPUID entries its vCPUs were given (`KVM_SET_CPUID2`) and
//! the MSRs saved with them, recorded in the VM state so that a restore, a migration or a live
//! update can tell whether this host offers everything the guest saw, and refuse before the
//! guest runs when it does not. A CPU template (`x86-64-v2`) masks the host's features down to
//! a baseline so that VMs can move between hosts of different generations.
//!
//! Masking CPUID informs the guest; on PVM it does not enforce anything: the guest can still
//! execute instructions of the host that CPUID does not advertise.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use serde::{Deserialize, Serialize};

/// `kvm_cpuid_entry2.flags`: the entry applies to one sub-leaf (`index`) only.
const SIGNIFICANT_INDEX: u32 = 1;

/// CPU model errors: each says what is missing or wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CpuModelError {
    /// `--cpu-template` names no template.
    #[error("unknown CPU template `{0}`: use `host` (everything this host offers) or `x86-64-v2` (a portable baseline)")]
    UnknownTemplate(String),
    /// This host lacks features (or MSRs) the guest was given.
    #[error("this host cannot offer the CPU the guest was given (CPU template `{template}`): {missing}. A guest must not run on a CPU lacking what it saw: {advice}")]
    Missing {
        /// The recorded model's template.
        template: CpuTemplate,
        /// What is missing, e.g. "missing CPU features: avx512f, x2apic; missing MSRs: 0x6e0".
        missing: String,
        /// What to do.
        advice: &'static str,
    },
    /// The recorded CPUID cannot be given to KVM.
    #[error(
        "the recorded CPU model has {0} CPUID entries; KVM takes at most {KVM_MAX_CPUID_ENTRIES}"
    )]
    TooManyEntries(usize),
}

/// A CPU template: what CPUID the vCPUs of a booted VM get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Everything this host's KVM offers (`KVM_GET_SUPPORTED_CPUID`).
    #[default]
    #[serde(rename = "host")]
    Host,
    /// The x86-64-v2 psABI level (cmpxchg16b, lahf/sahf, popcnt, sse3, sse4.1, sse4.2,
    /// ssse3 on top of the x86-64 baseline) plus the architectural features every x86-64 CPU
    /// has (apic, tsc, msr, pae, pge, pat, nx, ...).
    #[serde(rename = "x86-64-v2")]
    X86_64V2,
}

impl CpuTemplate {
    /// Every template, by name.
    pub const ALL: [CpuTemplate; 2] = [CpuTemplate::Host, CpuTemplate::X86_64V2];

    /// The template's name (`--cpu-template`).
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::X86_64V2 => "x86-64-v2",
        }
    }

    /// The CPUID a vCPU gets under this template, from what the host supports. APIC IDs are
    /// zero (KVM reports those of the host CPU the ioctl ran on; each vCPU gets its own when
    /// it is given the CPUID).
    pub fn apply(self, supported: &[CpuidEntry]) -> Vec<CpuidEntry> {
        let supported: Vec<CpuidEntry> = supported
            .iter()
            .map(|e| {
                let mut e = *e;
                match e.function {
                    1 => e.ebx &= 0x00ff_ffff,
                    0xb | 0x1f => e.edx = 0,
                    _ => {}
                }
                e
            })
            .collect();
        match self {
            CpuTemplate::Host => supported,
            CpuTemplate::X86_64V2 => supported
                .iter()
                // The XSAVE components beyond x87/SSE are described by sub-leaves 2 and up.
                .filter(|e| !(e.function == 0xd && e.index >= 2))
                .map(|e| {
                    let mut e = *e;
                    for &(leaf, sub, reg, keep) in V2_MASKS {
                        if e.applies_to(leaf, sub) {
                            *e.reg_mut(reg) &= keep;
                        }
                    }
                    if e.applies_to(0xd, 0) {
                        // x87 + SSE only: the legacy 512-byte area and the 64-byte header.
                        e.ebx = 576;
                        e.ecx = 576;
                    }
                    e
                })
                .collect(),
        }
    }
}

impl CpuTemplate {
    /// The template's baseline features that `cpuid` lacks (none for `host`, which has no
    /// baseline).
    pub fn lacking(self, cpuid: &[CpuidEntry]) -> Vec<Feature> {
        let required = match self {
            CpuTemplate::Host => return Vec::new(),
            CpuTemplate::X86_64V2 => V2_REQUIRED,
        };
        let mut out = Vec::new();
        for &(leaf, subleaf, reg, want) in required {
            let lacking = want & !reg_of(cpuid, leaf, subleaf, reg);
            out.extend(features_in(leaf, subleaf, reg, lacking));
        }
        out
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuTemplate {
    type Err = CpuModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| CpuModelError::UnknownTemplate(s.to_string()))
    }
}

/// One CPUID entry as given to `KVM_SET_CPUID2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input), when `flags` says it is significant.
    pub index: u32,
    /// KVM_CPUID_FLAG_*.
    pub flags: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        })
    }
}

impl CpuidEntry {
    fn applies_to(&self, leaf: u32, sub: u32) -> bool {
        self.function == leaf && (self.flags & SIGNIFICANT_INDEX == 0 || self.index == sub)
    }

    fn reg(&self, r: Reg) -> u32 {
        match r {
            Reg::Eax => self.eax,
            Reg::Ebx => self.ebx,
            Reg::Ecx => self.ecx,
            Reg::Edx => self.edx,
        }
    }

    fn reg_mut(&mut self, r: Reg) -> &mut u32 {
        match r {
            Reg::Eax => &mut self.eax,
            Reg::Ebx => &mut self.ebx,
            Reg::Ecx => &mut self.ecx,
            Reg::Edx => &mut self.edx,
        }
    }
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// The entries of a KVM CPUID list.
pub fn entries_of(cpuid: &CpuId) -> Vec<CpuidEntry> {
    cpuid.as_slice().iter().map(CpuidEntry::from).collect()
}

/// A KVM CPUID list of `entries`.
pub fn to_kvm(entries: &[CpuidEntry]) -> Result<CpuId, CpuModelError> {
    let raw: Vec<kvm_cpuid_entry2> = entries
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    if raw.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(CpuModelError::TooManyEntries(raw.len()));
    }
    CpuId::from_entries(&raw).map_err(|_| CpuModelError::TooManyEntries(raw.len()))
}

/// The registers that hold feature bits, compared between the recorded model and a host (and
/// masked by templates). Other leaves (vendor, topology, cache, KVM's own 0x4000_0000 range)
/// describe rather than offer, and are restored as recorded without comparison.
pub const FEATURE_REGS: &[(u32, u32, Reg)] = &[
    (0x1, 0, Reg::Ecx),
    (0x1, 0, Reg::Edx),
    (0x7, 0, Reg::Ebx),
    (0x7, 0, Reg::Ecx),
    (0x7, 0, Reg::Edx),
    (0x7, 1, Reg::Eax),
    (0xd, 0, Reg::Eax),
    (0xd, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
    (0x8000_0007, 0, Reg::Edx),
    (0x8000_0008, 0, Reg::Ebx),
    (0x8000_0021, 0, Reg::Eax),
];

const fn bits(list: &[u8]) -> u32 {
    let mut m = 0u32;
    let mut i = 0;
    while i < list.len() {
        m |= 1 << list[i];
        i += 1;
    }
    m
}

/// Leaf 1 EDX under x86-64-v2: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov
/// pat pse36 clflush mmx fxsr sse sse2.
const V2_1_EDX: u32 = bits(&[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26,
]);
/// Leaf 1 ECX under x86-64-v2: sse3 ssse3 cx16 sse4_1 sse4_2 popcnt hypervisor.
const V2_1_ECX: u32 = bits(&[0, 9, 13, 19, 20, 23, 31]);
/// Leaf 0x8000_0001 EDX under x86-64-v2: syscall nx lm. (AMD also mirrors leaf-1 EDX bits
/// here; Intel does not, so a portable model leaves them out: guests read them in leaf 1.)
const V2_E1_EDX: u32 = bits(&[11, 20, 29]);
/// Leaf 0x8000_0001 ECX under x86-64-v2: lahf_lm.
const V2_E1_ECX: u32 = bits(&[0]);

/// The x86-64-v2 psABI level itself (with the x86-64 baseline): what a guest given the
/// template expects; a host whose KVM does not offer all of it gives the guest less (said at
/// boot, and in the status).
const V2_REQUIRED: &[(u32, u32, Reg, u32)] = &[
    // sse3 ssse3 cx16 sse4_1 sse4_2 popcnt
    (0x1, 0, Reg::Ecx, bits(&[0, 9, 13, 19, 20, 23])),
    // fpu cx8 cmov mmx fxsr sse sse2
    (0x1, 0, Reg::Edx, bits(&[0, 8, 15, 23, 24, 25, 26])),
    // lahf_lm
    (0x8000_0001, 0, Reg::Ecx, bits(&[0])),
    // syscall lm
    (0x8000_0001, 0, Reg::Edx, bits(&[11, 29])),
];

/// What x86-64-v2 keeps of each feature register (everything not listed is cleared).
const V2_MASKS: &[(u32, u32, Reg, u32)] = &[
    (0x1, 0, Reg::Ecx, V2_1_ECX),
    (0x1, 0, Reg::Edx, V2_1_EDX),
    (0x7, 0, Reg::Ebx, 0),
    (0x7, 0, Reg::Ecx, 0),
    (0x7, 0, Reg::Edx, 0),
    (0x7, 1, Reg::Eax, 0),
    (0xd, 0, Reg::Eax, 0b11),
    (0xd, 0, Reg::Edx, 0),
    (0xd, 1, Reg::Eax, 0),
    (0x8000_0001, 0, Reg::Ecx, V2_E1_ECX),
    (0x8000_0001, 0, Reg::Edx, V2_E1_EDX),
    (0x8000_0007, 0, Reg::Edx, 0),
    (0x8000_0008, 0, Reg::Ebx, 0),
    (0x8000_0021, 0, Reg::Eax, 0),
];

/// Names of feature bits (Linux's /proc/cpuinfo names where it has one).
fn feature_name(leaf: u32, sub: u32, reg: Reg, bit: u8) -> Option<&'static str> {
    let table: &[(u8, &str)] = match (leaf, sub, reg) {
        (0x1, _, Reg::Edx) => &[
            (0, "fpu"),
            (1, "vme"),
            (2, "de"),
            (3, "pse"),
            (4, "tsc"),
            (5, "msr"),
            (6, "pae"),
            (7, "mce"),
            (8, "cx8"),
            (9, "apic"),
            (11, "sep"),
            (12, "mtrr"),
            (13, "pge"),
            (14, "mca"),
            (15, "cmov"),
            (16, "pat"),
            (17, "pse36"),
            (19, "clflush"),
            (21, "dts"),
            (22, "acpi"),
            (23, "mmx"),
            (24, "fxsr"),
            (25, "sse"),
            (26, "sse2"),
            (27, "ss"),
            (28, "ht"),
            (29, "tm"),
            (31, "pbe"),
        ],
        (0x1, _, Reg::Ecx) => &[
            (0, "sse3"),
            (1, "pclmulqdq"),
            (2, "dtes64"),
            (3, "monitor"),
            (4, "ds_cpl"),
            (5, "vmx"),
            (6, "smx"),
            (7, "est"),
            (8, "tm2"),
            (9, "ssse3"),
            (10, "cid"),
            (11, "sdbg"),
            (12, "fma"),
            (13, "cx16"),
            (14, "xtpr"),
            (15, "pdcm"),
            (17, "pcid"),
            (18, "dca"),
            (19, "sse4_1"),
            (20, "sse4_2"),
            (21, "x2apic"),
            (22, "movbe"),
            (23, "popcnt"),
            (24, "tsc_deadline_timer"),
            (25, "aes"),
            (26, "xsave"),
            (27, "osxsave"),
            (28, "avx"),
            (29, "f16c"),
            (30, "rdrand"),
            (31, "hypervisor"),
        ],
        (0x7, 0, Reg::Ebx) => &[
            (0, "fsgsbase"),
            (1, "tsc_adjust"),
            (2, "sgx"),
            (3, "bmi1"),
            (4, "hle"),
            (5, "avx2"),
            (6, "fdp_excptn_only"),
            (7, "smep"),
            (8, "bmi2"),
            (9, "erms"),
            (10, "invpcid"),
            (11, "rtm"),
            (12, "cqm"),
            (13, "zero_fcs_fds"),
            (14, "mpx"),
            (15, "rdt_a"),
            (16, "avx512f"),
            (17, "avx512dq"),
            (18, "rdseed"),
            (19, "adx"),
            (20, "smap"),
            (21, "avx512ifma"),
            (23, "clflushopt"),
            (24, "clwb"),
            (25, "intel_pt"),
            (26, "avx512pf"),
            (27, "avx512er"),
            (28, "avx512cd"),
            (29, "sha_ni"),
            (30, "avx512bw"),
            (31, "avx512vl"),
        ],
        (0x7, 0, Reg::Ecx) => &[
            (0, "prefetchwt1"),
            (1, "avx512vbmi"),
            (2, "umip"),
            (3, "pku"),
            (4, "ospke"),
            (5, "waitpkg"),
            (6, "avx512_vbmi2"),
            (7, "shstk"),
            (8, "gfni"),
            (9, "vaes"),
            (10, "vpclmulqdq"),
            (11, "avx512_vnni"),
            (12, "avx512_bitalg"),
            (13, "tme"),
            (14, "avx512_vpopcntdq"),
            (16, "la57"),
            (22, "rdpid"),
            (24, "bus_lock_detect"),
            (25, "cldemote"),
            (27, "movdiri"),
            (28, "movdir64b"),
            (29, "enqcmd"),
            (30, "sgx_lc"),
            (31, "pks"),
        ],
        (0x7, 0, Reg::Edx) => &[
            (2, "avx512_4vnniw"),
            (3, "avx512_4fmaps"),
            (4, "fsrm"),
            (5, "uintr"),
            (8, "avx512_vp2intersect"),
            (10, "md_clear"),
            (14, "serialize"),
            (16, "tsxldtrk"),
            (18, "pconfig"),
            (19, "arch_lbr"),
            (20, "ibt"),
            (22, "amx_bf16"),
            (23, "avx512_fp16"),
            (24, "amx_tile"),
            (25, "amx_int8"),
            (26, "spec_ctrl"),
            (27, "intel_stibp"),
            (28, "flush_l1d"),
            (29, "arch_capabilities"),
            (30, "core_capabilities"),
            (31, "spec_ctrl_ssbd"),
        ],
        (0x7, 1, Reg::Eax) => &[
            (4, "avx_vnni"),
            (5, "avx512_bf16"),
            (10, "fzrm"),
            (11, "fsrs"),
            (12, "fsrc"),
            (26, "lam"),
        ],
        (0xd, 0, Reg::Eax) => &[
            (0, "xsave:x87"),
            (1, "xsave:sse"),
            (2, "xsave:avx"),
            (3, "xsave:bndregs"),
            (4, "xsave:bndcsr"),
            (5, "xsave:opmask"),
            (6, "xsave:zmm_hi256"),
            (7, "xsave:hi16_zmm"),
            (9, "xsave:pkru"),
            (17, "xsave:xtilecfg"),
            (18, "xsave:xtiledata"),
        ],
        (0xd, 1, Reg::Eax) => &[
            (0, "xsaveopt"),
            (1, "xsavec"),
            (2, "xgetbv1"),
            (3, "xsaves"),
            (4, "xfd"),
        ],
        (0x8000_0001, _, Reg::Edx) => &[
            (11, "syscall"),
            (19, "mp"),
            (20, "nx"),
            (22, "mmxext"),
            (25, "fxsr_opt"),
            (26, "pdpe1gb"),
            (27, "rdtscp"),
            (29, "lm"),
            (30, "3dnowext"),
            (31, "3dnow"),
        ],
        (0x8000_0001, _, Reg::Ecx) => &[
            (0, "lahf_lm"),
            (1, "cmp_legacy"),
            (2, "svm"),
            (3, "extapic"),
            (4, "cr8_legacy"),
            (5, "abm"),
            (6, "sse4a"),
            (7, "misalignsse"),
            (8, "3dnowprefetch"),
            (9, "osvw"),
            (10, "ibs"),
            (11, "xop"),
            (12, "skinit"),
            (13, "wdt"),
            (15, "lwp"),
            (16, "fma4"),
            (17, "tce"),
            (19, "nodeid_msr"),
            (21, "tbm"),
            (22, "topoext"),
            (23, "perfctr_core"),
            (24, "perfctr_nb"),
            (26, "bpext"),
            (27, "ptsc"),
            (28, "perfctr_llc"),
            (29, "mwaitx"),
        ],
        (0x8000_0007, _, Reg::Edx) => &[(8, "constant_tsc")],
        (0x8000_0008, _, Reg::Ebx) => &[
            (0, "clzero"),
            (1, "irperf"),
            (2, "xsaveerptr"),
            (4, "rdpru"),
            (9, "wbnoinvd"),
            (12, "ibpb"),
            (14, "ibrs"),
            (15, "stibp"),
            (24, "ssbd"),
            (25, "virt_ssbd"),
            (26, "ssb_no"),
        ],
        (0x8000_0021, _, Reg::Eax) => &[
            (0, "no_nested_data_bp"),
            (2, "lfence_rdtsc"),
            (6, "null_sel_clr_base"),
            (8, "autoibrs"),
        ],
        _ => &[],
    };
    table.iter().find(|(b, _)| *b == bit).map(|(_, n)| *n)
}

/// A feature bit the recorded model has and a host lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// CPUID leaf.
    pub leaf: u32,
    /// Sub-leaf.
    pub subleaf: u32,
    /// Register.
    pub reg: Reg,
    /// Bit.
    pub bit: u8,
}

impl Feature {
    /// Its name, where one is known.
    pub fn name(&self) -> Option<&'static str> {
        feature_name(self.leaf, self.subleaf, self.reg, self.bit)
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(
                f,
                "cpuid {:#x}.{} {} bit {}",
                self.leaf, self.subleaf, self.reg, self.bit
            ),
        }
    }
}

/// The value of a feature register in `entries` (0 where the leaf is absent).
fn reg_of(entries: &[CpuidEntry], leaf: u32, sub: u32, reg: Reg) -> u32 {
    entries
        .iter()
        .find(|e| e.applies_to(leaf, sub))
        .map_or(0, |e| e.reg(reg))
}

/// The features whose bits are set in `bits`, a value of register `reg` of leaf/subleaf.
fn features_in(leaf: u32, subleaf: u32, reg: Reg, bits: u32) -> impl Iterator<Item = Feature> {
    (0..32u8)
        .filter(move |b| bits & (1 << b) != 0)
        .map(move |bit| Feature {
            leaf,
            subleaf,
            reg,
            bit,
        })
}

/// Every feature bit set in `recorded` that `host` does not offer, in register order.
pub fn missing_features(recorded: &[CpuidEntry], host: &[CpuidEntry]) -> Vec<Feature> {
    let mut out = Vec::new();
    for &(leaf, subleaf, reg) in FEATURE_REGS {
        let lacking = reg_of(recorded, leaf, subleaf, reg) & !reg_of(host, leaf, subleaf, reg);
        out.extend(features_in(leaf, subleaf, reg, lacking));
    }
    out
}

/// Test hook: `SPANVMM_TEST_HOST_LACKS=name,name` in the environment makes the comparison
/// treat this host as lacking those named features (e.g. `sse2`), so that tests can show a
/// migration destination or a live update's new process refusing a guest it cannot run.
/// It changes what is compared only, never the CPUID any vCPU is given.
pub fn host_as_compared(mut host: Vec<CpuidEntry>) -> Vec<CpuidEntry> {
    let Ok(names) = std::env::var("SPANVMM_TEST_HOST_LACKS") else {
        return host;
    };
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        for &(leaf, subleaf, reg) in FEATURE_REGS {
            for bit in 0..32u8 {
                if feature_name(leaf, subleaf, reg, bit) == Some(name) {
                    for e in host.iter_mut().filter(|e| e.applies_to(leaf, subleaf)) {
                        *e.reg_mut(reg) &= !(1 << bit);
                    }
                }
            }
        }
    }
    host
}

/// Every feature bit `entries` offers.
pub fn features(entries: &[CpuidEntry]) -> Vec<Feature> {
    missing_features(entries, &[])
}

/// Names of a few MSRs, for messages.
fn msr_name(index: u32) -> Option<&'static str> {
    Some(match index {
        0x10 => "tsc",
        0x1b => "apic_base",
        0x3a => "feature_control",
        0x3b => "tsc_adjust",
        0x48 => "spec_ctrl",
        0x10a => "arch_capabilities",
        0x174 => "sysenter_cs",
        0x175 => "sysenter_esp",
        0x176 => "sysenter_eip",
        0x1a0 => "misc_enable",
        0x277 => "pat",
        0x6e0 => "tsc_deadline",
        0xda0 => "xss",
        0xc000_0080 => "efer",
        0xc000_0081 => "star",
        0xc000_0082 => "lstar",
        0xc000_0083 => "cstar",
        0xc000_0084 => "syscall_mask",
        0xc000_0100 => "fs_base",
        0xc000_0101 => "gs_base",
        0xc000_0102 => "kernel_gs_base",
        0xc000_0103 => "tsc_aux",
        0x4b56_4d00 => "kvm_wall_clock_new",
        0x4b56_4d01 => "kvm_system_time_new",
        0x4b56_4d02 => "kvm_async_pf_en",
        0x4b56_4d03 => "kvm_steal_time",
        0x4b56_4d04 => "kvm_pv_eoi_en",
        _ => return None,
    })
}

/// The CPU a guest was given: recorded in the VM state at boot, carried by snapshots,
/// migrations and live updates, and given to the vCPUs again on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// The template it was made with.
    pub template: CpuTemplate,
    /// The CPUID given to every vCPU (before each vCPU's APIC ID is patched in).
    pub cpuid: Vec<CpuidEntry>,
    /// The MSRs saved and restored with each vCPU.
    pub msrs: Vec<u32>,
}

/// A short description of a CPU model (`GET /vm`).
#[derive(Clone, Debug, Serialize)]
pub struct CpuSummary {
    /// Template name.
    pub template: &'static str,
    /// Vendor string (CPUID leaf 0), e.g. "AuthenticAMD".
    pub vendor: String,
    /// Family (display family: base + extended).
    pub family: u32,
    /// Model (display model).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// Feature bits offered in the compared registers ([`FEATURE_REGS`]).
    pub feature_bits: usize,
    /// CPUID entries.
    pub cpuid_entries: usize,
    /// MSRs saved per vCPU.
    pub msrs: usize,
    /// Features of the template's baseline the guest was not given, because the host it
    /// booted on did not offer them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub template_lacks: Vec<String>,
}

impl CpuModel {
    /// A short description.
    pub fn summary(&self) -> CpuSummary {
        let leaf = |f| {
            self.cpuid
                .iter()
                .find(|e| e.applies_to(f, 0))
                .copied()
                .unwrap_or(CpuidEntry {
                    function: f,
                    index: 0,
                    flags: 0,
                    eax: 0,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                })
        };
        let l0 = leaf(0);
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        let eax = leaf(1).eax;
        let base_family = (eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let mut model = (eax >> 4) & 0xf;
        if base_family == 0x6 || base_family == 0xf {
            model |= ((eax >> 16) & 0xf) << 4;
        }
        CpuSummary {
            template: self.template.name(),
            vendor: String::from_utf8_lossy(&vendor)
                .trim_end_matches('\0')
                .to_string(),
            family,
            model,
            stepping: eax & 0xf,
            feature_bits: features(&self.cpuid).len(),
            cpuid_entries: self.cpuid.len(),
            msrs: self.msrs.len(),
            template_lacks: self
                .template
                .lacking(&self.cpuid)
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// Checks that a host offering `host_cpuid` (`KVM_GET_SUPPORTED_CPUID`) and able to save
    /// `host_msrs` can give the guest everything it was given.
    pub fn check_against(
        &self,
        host_cpuid: &[CpuidEntry],
        host_msrs: &[u32],
    ) -> Result<(), CpuModelError> {
        let features = missing_features(&self.cpuid, host_cpuid);
        let msrs: Vec<u32> = self
            .msrs
            .iter()
            .copied()
            .filter(|m| !host_msrs.contains(m))
            .collect();
        if features.is_empty() && msrs.is_empty() {
            return Ok(());
        }
        let mut parts = Vec::new();
        if !features.is_empty() {
            let names: Vec<String> = features.iter().map(ToString::to_string).collect();
            parts.push(format!("missing CPU features: {}", names.join(", ")));
        }
        if !msrs.is_empty() {
            let names: Vec<String> = msrs
                .iter()
                .map(|&m| match msr_name(m) {
                    Some(n) => format!("{m:#x} ({n})"),
                    None => format!("{m:#x}"),
                })
                .collect();
            parts.push(format!("missing MSRs: {}", names.join(", ")));
        }
        let advice = match self.template {
            CpuTemplate::Host => {
                "restore or migrate it to a host with these features, or boot VMs with \
                 `spanvmm run --cpu-template x86-64-v2` so that they can move between hosts"
            }
            CpuTemplate::X86_64V2 => {
                "this host is below the template's baseline (or lacks MSRs the guest's CPU had): \
                 restore or migrate it to a host with these features"
            }
        };
        Err(CpuModelError::Missing {
            template: self.template,
            missing: parts.join("; "),
            advice,
        })
    }

    /// The CPUID in KVM's form.
    pub fn kvm_cpuid(&self) -> Result<CpuId, CpuModelError> {
        to_kvm(&self.cpuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: if function == 7 || function == 0xd {
                SIGNIFICANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// A made-up modern host: AVX-512, x2apic, everything v2 needs and more.
    fn big_host() -> Vec<CpuidEntry> {
        let vendor = u32::from_le_bytes(*b"Auth");
        vec![
            entry(
                0,
                0,
                0x10,
                vendor,
                u32::from_le_bytes(*b"cAMD"),
                u32::from_le_bytes(*b"enti"),
            ),
            // Family 0x19 (0xf + 0xa), model 0x11, stepping 1.
            entry(1, 0, 0x00a1_0f11, 0, 0xfefa_3203, 0x178b_fbff),
            entry(7, 0, 1, 0xf1bf_07ab, 0x0040_5fce, 0x1000_0010),
            entry(7, 1, 0x30, 0, 0, 0),
            entry(0xd, 0, 0xe7, 0x988, 0x988, 0),
            entry(0xd, 1, 0xf, 0, 0, 0),
            entry(0xd, 2, 0x100, 0x240, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0x75c2_37ff, 0x2fd3_fbff),
            entry(0x8000_0007, 0, 0, 0, 0, 0x100),
            entry(0x8000_0008, 0, 0x3030, 0x0100_d205, 0, 0),
        ]
    }

    #[test]
    fn a_model_fits_its_own_host_and_a_smaller_host_is_named_missing_features() {
        let host = big_host();
        let model = CpuModel {
            template: CpuTemplate::Host,
            cpuid: host.clone(),
            msrs: vec![0x10, 0x6e0],
        };
        model.check_against(&host, &[0x10, 0x6e0, 0x1b]).unwrap();

        // A host without AVX-512F/DQ (7.0 ebx bits 16, 17), x2apic (1 ecx bit 21), an
        // unnamed bit (7.0 edx bit 1), and without the TSC-deadline MSR.
        let mut small = host.clone();
        small[2].ebx &= !(1 << 16 | 1 << 17);
        small[2].edx &= !(1 << 4);
        small[1].ecx &= !(1 << 21);
        let mut recorded = model.clone();
        recorded.cpuid[2].edx |= 1 << 1;
        let missing = missing_features(&recorded.cpuid, &small);
        let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "x2apic",
                "avx512f",
                "avx512dq",
                "cpuid 0x7.0 edx bit 1",
                "fsrm"
            ]
        );
        let e = recorded
            .check_against(&small, &[0x10])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "missing CPU features: x2apic, avx512f, avx512dq, cpuid 0x7.0 edx bit 1, fsrm"
            ),
            "{e}"
        );
        assert!(e.contains("missing MSRs: 0x6e0 (tsc_deadline)"), "{e}");
        assert!(e.contains("--cpu-template x86-64-v2"), "{e}");
        // A leaf the host does not have at all: every bit of it is missing.
        let no_ext: Vec<CpuidEntry> = host
            .iter()
            .copied()
            .filter(|e| e.function != 0x8000_0007)
            .collect();
        let e = model
            .check_against(&no_ext, &[0x10, 0x6e0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing CPU features: constant_tsc"), "{e}");
        assert!(!e.contains("MSRs"), "{e}");
        // Descriptive leaves (vendor, topology, APIC ID) are not compared.
        let mut other = host.clone();
        other[0].ebx = 0;
        other[1].ebx = 0xff00_0000;
        other[1].eax = 0x906ea;
        model.check_against(&other, &[0x10, 0x6e0]).unwrap();
    }

    #[test]
    fn x86_64_v2_masks_down_to_the_baseline_and_fits_any_v2_host() {
        let host = big_host();
        let v2 = CpuTemplate::X86_64V2.apply(&host);
        let names: Vec<String> = features(&v2).iter().map(ToString::to_string).collect();
        for want in [
            "cx16",
            "lahf_lm",
            "popcnt",
            "sse3",
            "sse4_1",
            "sse4_2",
            "ssse3",
            "cmov",
            "cx8",
            "fpu",
            "fxsr",
            "mmx",
            "sse",
            "sse2",
            "syscall",
            "nx",
            "lm",
            "xsave:x87",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        for gone in [
            "avx",
            "avx2",
            "avx512f",
            "x2apic",
            "xsave",
            "aes",
            "pcid",
            "xsave:avx",
            "xsaveopt",
            "rdtscp",
            "pdpe1gb",
            "constant_tsc",
            "abm",
            "fsrm",
            "sha_ni",
        ] {
            assert!(!names.iter().any(|n| n == gone), "{gone} kept in {names:?}");
        }
        // The XSAVE component sub-leaves are gone, the area is the legacy one.
        assert!(!v2.iter().any(|e| e.function == 0xd && e.index >= 2));
        let d0 = v2
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .unwrap();
        assert_eq!((d0.eax, d0.ecx), (0b11, 576));
        // Vendor and family/model are the host's.
        let m = CpuModel {
            template: CpuTemplate::X86_64V2,
            cpuid: v2.clone(),
            msrs: vec![],
        };
        let s = m.summary();
        assert_eq!(
            (s.vendor.as_str(), s.family, s.model, s.stepping),
            ("AuthenticAMD", 0x19, 0x11, 1)
        );
        assert_eq!(s.feature_bits, names.len());
        assert!(s.template_lacks.is_empty(), "{:?}", s.template_lacks);
        // A host whose KVM offers less than the baseline: the guest is told less, and the
        // summary says what.
        let mut poor = host.clone();
        poor[1].ecx &= !(1 << 0 | 1 << 19);
        let pm = CpuModel {
            template: CpuTemplate::X86_64V2,
            cpuid: CpuTemplate::X86_64V2.apply(&poor),
            msrs: vec![],
        };
        assert_eq!(pm.summary().template_lacks, ["sse3", "sse4_1"]);
        assert!(CpuTemplate::Host.lacking(&poor).is_empty());
        assert!(s.feature_bits < features(&host).len());

        // An older host with only the v2 features (plus some v2 does not need) takes the
        // v2 model, but not the host model of the big one.
        let mut old = host.clone();
        old[1].ecx = V2_1_ECX | 1 << 1; // + pclmulqdq
        old[2].ebx = 0;
        old[2].ecx = 0;
        old[2].edx = 0;
        old[3].eax = 0;
        old[4].eax = 0b11;
        old[5].eax = 0;
        old[8].edx = 0;
        old[9].ebx = 0;
        old[7].ecx = 1;
        m.check_against(&old, &[]).unwrap();
        let host_model = CpuModel {
            template: CpuTemplate::Host,
            cpuid: host.clone(),
            msrs: vec![],
        };
        let e = host_model.check_against(&old, &[]).unwrap_err().to_string();
        assert!(
            e.contains("avx512f") && e.contains("x2apic") && e.contains("template `host`"),
            "{e}"
        );
        // A host below v2 is refused even the v2 model, naming what it lacks.
        let mut ancient = old.clone();
        ancient[1].ecx &= !(1 << 20 | 1 << 23);
        let e = m.check_against(&ancient, &[]).unwrap_err().to_string();
        assert!(e.contains("missing CPU features: sse4_2, popcnt"), "{e}");
        // Applying the template twice changes nothing.
        assert_eq!(CpuTemplate::X86_64V2.apply(&v2), v2);
        // The advice fits the template: a baseline model's host is below the baseline.
        let e = m.check_against(&ancient, &[]).unwrap_err().to_string();
        assert!(e.contains("below the template's baseline"), "{e}");
        // APIC IDs of the host CPU the ioctl ran on are not part of the model.
        let (mut on_cpu5, mut on_cpu0) = (host.clone(), host.clone());
        on_cpu5[1].ebx = 0x0502_0800;
        on_cpu0[1].ebx = 0x0002_0800;
        for t in CpuTemplate::ALL {
            assert_eq!(t.apply(&on_cpu5)[1].ebx, 0x0002_0800, "{t}");
            assert_eq!(t.apply(&on_cpu5), t.apply(&on_cpu0), "{t}");
        }
    }

    #[test]
    fn templates_parse_by_name_and_round_trip_through_json() {
        assert_eq!("host".parse::<CpuTemplate>().unwrap(), CpuTemplate::Host);
        assert_eq!(
            "x86-64-v2".parse::<CpuTemplate>().unwrap(),
            CpuTemplate::X86_64V2
        );
        let e = "skylake".parse::<CpuTemplate>().unwrap_err().to_string();
        assert!(
            e.contains("unknown CPU template `skylake`") && e.contains("x86-64-v2"),
            "{e}"
        );
        let m = CpuModel {
            template: CpuTemplate::X86_64V2,
            cpuid: big_host(),
            msrs: vec![0x10],
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains(r#""template":"x86-64-v2""#), "{j}");
        assert_eq!(serde_json::from_str::<CpuModel>(&j).unwrap(), m);
        let k = m.kvm_cpuid().unwrap();
        assert_eq!(entries_of(&k), m.cpuid);
    }
}
