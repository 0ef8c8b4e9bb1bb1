//! Builds minimal ELF64 kernel images for tests: PT_LOAD segments at
//! chosen physical addresses and, optionally, the PVH entry note
//! (`XEN_ELFNOTE_PHYS32_ENTRY`, type 18, name "Xen").
//!
//! Shared by the loader's unit tests (through `#[path]`) and the
//! integration tests.

#![allow(dead_code)]

/// ELF type 18: the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// One loadable segment.
pub struct Segment {
    /// Physical (and virtual) load address.
    pub addr: u64,
    /// File contents.
    pub data: Vec<u8>,
    /// Size in memory (at least `data.len()`; the rest is zero-filled).
    pub mem_size: u64,
}

/// An ELF64 image under construction.
pub struct ElfBuilder {
    /// `e_entry`.
    pub entry: u64,
    /// Loadable segments.
    pub segments: Vec<Segment>,
    /// PVH entry point, emitted as a PT_NOTE.
    pub pvh_entry: Option<u32>,
    /// `EI_CLASS` (2 = 64-bit).
    pub class: u8,
    /// `e_machine` (62 = x86-64).
    pub machine: u16,
}

impl ElfBuilder {
    /// An x86-64 executable entered at `entry`, with no segments yet.
    pub fn new(entry: u64) -> Self {
        ElfBuilder {
            entry,
            segments: Vec::new(),
            pvh_entry: None,
            class: 2,
            machine: 62,
        }
    }

    /// Adds a segment holding `data` at `addr`.
    pub fn segment(mut self, addr: u64, data: &[u8]) -> Self {
        self.segments.push(Segment {
            addr,
            data: data.to_vec(),
            mem_size: data.len() as u64,
        });
        self
    }

    /// Adds the PVH note with entry point `entry`.
    pub fn pvh(mut self, entry: u32) -> Self {
        self.pvh_entry = Some(entry);
        self
    }

    /// The file bytes.
    pub fn build(&self) -> Vec<u8> {
        let note = self.pvh_entry.map(|entry| {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&entry.to_le_bytes());
            n
        });
        let phnum = self.segments.len() + usize::from(note.is_some());
        let mut offset = EHDR_SIZE + phnum * PHDR_SIZE;

        let mut phdrs = Vec::new();
        let mut payload = Vec::new();
        let mut push_phdr = |kind: u32, addr: u64, data: &[u8], mem_size: u64| {
            // Keep file offsets 16-byte aligned, like real linkers do.
            let pad = (16 - offset % 16) % 16;
            payload.extend(std::iter::repeat_n(0u8, pad));
            offset += pad;
            let mut p = Vec::with_capacity(PHDR_SIZE);
            p.extend_from_slice(&kind.to_le_bytes());
            p.extend_from_slice(&7u32.to_le_bytes()); // flags: RWX
            p.extend_from_slice(&(offset as u64).to_le_bytes());
            p.extend_from_slice(&addr.to_le_bytes()); // vaddr
            p.extend_from_slice(&addr.to_le_bytes()); // paddr
            p.extend_from_slice(&(data.len() as u64).to_le_bytes());
            p.extend_from_slice(&mem_size.to_le_bytes());
            p.extend_from_slice(&16u64.to_le_bytes()); // align
            phdrs.extend_from_slice(&p);
            payload.extend_from_slice(data);
            offset += data.len();
        };
        for s in &self.segments {
            push_phdr(PT_LOAD, s.addr, &s.data, s.mem_size);
        }
        if let Some(n) = &note {
            push_phdr(PT_NOTE, 0, n, n.len() as u64);
        }

        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF");
        out.push(self.class);
        out.push(1); // little-endian
        out.push(1); // EI_VERSION
        out.extend_from_slice(&[0; 9]);
        out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out.extend_from_slice(&self.machine.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes()); // e_version
        out.extend_from_slice(&self.entry.to_le_bytes());
        out.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        out.extend_from_slice(&(phnum as u16).to_le_bytes());
        out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        assert_eq!(out.len(), EHDR_SIZE);
        out.extend_from_slice(&phdrs);
        out.extend_from_slice(&payload);
        out
    }
}

/// A minimal bzImage: one setup sector after the boot sector, a setup
/// header claiming `version` and `xloadflags`, and `payload` as the
/// protected-mode kernel.
pub fn bzimage(version: u16, xloadflags: u16, init_size: u32, payload: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut img = vec![0u8; 512 * (usize::from(setup_sects) + 1)];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    img.extend_from_slice(payload);
    img
}
