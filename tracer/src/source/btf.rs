//! The kernel's layout, from its BTF (/sys/kernel/btf/vmlinux): where the programs find a
//! socket's addresses, ports, family, cookie and network namespace, and a timewait socket's
//! timer and substate. Plus the one thing BTF has no answer for: the address of
//! `tw_timer_handler` (/proc/kallsyms). Nothing of one kernel's layout is compiled in.

use std::ops::RangeInclusive;
use std::path::Path;

use btf_rs::{Btf, Type};
use thiserror::Error;
use tracer_common::{ConnLayout, MAX_HEAD, SockLayout};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
pub const KALLSYMS: &str = "/proc/kallsyms";

/// Something tcplens needs is not in this kernel's BTF (or not as tcplens reads it).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct LayoutError(pub String);

fn err(what: impl Into<String>) -> LayoutError {
    LayoutError(what.into())
}

/// The kernel's BTF, parsed.
pub struct KernelBtf(Btf);

impl KernelBtf {
    pub fn open(path: &Path) -> Result<Self, LayoutError> {
        // Mapped and parsed as it is looked up, where the kernel lets the file be mapped
        // (Linux 6.15 on): a few ms, against about 70 for parsing all of it.
        match Btf::from_file_with_backend(path, btf_rs::Backend::Mmap) {
            Ok(btf) => Ok(KernelBtf(btf)),
            Err(_) => Self::read(path),
        }
    }

    /// The BTF read and parsed at once (btf-rs's file backend seeks for every type: 100 k+
    /// syscalls).
    fn read(path: &Path) -> Result<Self, LayoutError> {
        let bytes = std::fs::read(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        Btf::from_bytes(&bytes)
            .map(KernelBtf)
            .map_err(|e| err(format!("{}: {e}", path.display())))
    }

    /// Byte offset of `path` (members, looking into anonymous structs and unions and
    /// through typedefs) inside struct `ty`, checking the last member's size is in `sizes`.
    pub fn offset(
        &self,
        ty: &str,
        path: &[&str],
        sizes: RangeInclusive<usize>,
    ) -> Result<u32, LayoutError> {
        let btf = &self.0;
        let types = btf
            .resolve_types_by_name(ty)
            .map_err(|e| err(format!("no struct {ty} in the kernel BTF: {e}")))?;
        let mut cur = types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| err(format!("no struct {ty} in the kernel BTF")))?;
        let shown = || format!("{ty}.{}", path.join("."));
        let mut bits = 0;
        for (i, name) in path.iter().enumerate() {
            let (at, member_ty) = find_member(btf, &cur, name)
                .ok_or_else(|| err(format!("no member {} in the kernel BTF", shown())))?;
            bits += at;
            if i + 1 == path.len() {
                let size = type_size(btf, &member_ty)
                    .ok_or_else(|| err(format!("{} has no size in the kernel BTF", shown())))?;
                if bits % 8 != 0 || !sizes.contains(&size) {
                    return Err(err(format!(
                        "{} is {size} bytes at bit {bits}, not what tcplens reads",
                        shown()
                    )));
                }
                return Ok(bits / 8);
            }
            cur = match strip(btf, member_ty) {
                Some(Type::Struct(s) | Type::Union(s)) => s,
                _ => return Err(err(format!("{} is not a struct", shown()))),
            };
        }
        Err(err(format!("empty member path in {ty}")))
    }

    /// Where a socket of struct `ty` (whose `struct sock_common` is member `common`) keeps
    /// what the programs read, its local port being `sport` (a struct and member path at
    /// the same base); `extra` are (offset, size) of further fields the copied head must
    /// cover.
    pub fn sock_layout(
        &self,
        ty: &str,
        common: &str,
        sport: (&str, &[&str]),
        extra: &[(u32, u32)],
    ) -> Result<SockLayout, LayoutError> {
        let at =
            |path: &[&str], size: usize| self.offset(ty, &[&[common], path].concat(), size..=size);
        let l = SockLayout {
            daddr: at(&["skc_daddr"], 4)?,
            rcv_saddr: at(&["skc_rcv_saddr"], 4)?,
            dport: at(&["skc_dport"], 2)?,
            sport: self.offset(sport.0, sport.1, 2..=2)?,
            family: at(&["skc_family"], 2)?,
            v6_daddr: at(&["skc_v6_daddr"], 16)?,
            v6_rcv_saddr: at(&["skc_v6_rcv_saddr"], 16)?,
            cookie: at(&["skc_cookie"], 8)?,
            net: at(&["skc_net", "net"], 8)?,
            head: 0,
        };
        let head = [
            (l.daddr, 4),
            (l.rcv_saddr, 4),
            (l.dport, 2),
            (l.family, 2),
            (l.v6_daddr, 16),
            (l.v6_rcv_saddr, 16),
            (l.cookie, 8),
            (l.net, 8),
        ]
        .iter()
        .chain(extra)
        .map(|(off, size)| off + size)
        .max()
        .unwrap_or(0);
        if head > MAX_HEAD {
            return Err(err(format!(
                "the fields of struct {ty} end at byte {head}, past the {MAX_HEAD} tcplens copies"
            )));
        }
        Ok(SockLayout { head, ..l })
    }
}

/// (bit offset, type) of member `field` of `s`, searching anonymous members recursively.
fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str) -> Option<(u32, Type)> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = btf.resolve_chained_type(m).ok()?;
        if name == field {
            return Some((m.bit_offset(), ty));
        }
        if name.is_empty()
            && let Some(Type::Struct(inner) | Type::Union(inner)) = strip(btf, ty)
            && let Some((at, hit)) = find_member(btf, &inner, field)
        {
            return Some((m.bit_offset() + at, hit));
        }
    }
    None
}

/// A type without its typedefs and qualifiers.
#[allow(clippy::match_same_arms)] // one arm per variant: each holds a different type
fn strip(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t).ok()?,
            Type::Volatile(t) => btf.resolve_chained_type(t).ok()?,
            Type::Const(t) => btf.resolve_chained_type(t).ok()?,
            Type::Restrict(t) => btf.resolve_chained_type(t).ok()?,
            Type::TypeTag(t) => btf.resolve_chained_type(t).ok()?,
            _ => return Some(ty),
        };
    }
    None
}

/// Size in bytes of a type.
fn type_size(btf: &Btf, ty: &Type) -> Option<usize> {
    match strip(btf, ty.clone())? {
        Type::Int(i) => Some(i.size()),
        Type::Ptr(_) => Some(8),
        Type::Struct(s) | Type::Union(s) => Some(s.size()),
        Type::Enum(e) => Some(e.size()),
        Type::Array(a) => {
            let elem = btf.resolve_chained_type(&a).ok()?;
            Some(a.len() * type_size(btf, &elem)?)
        }
        _ => None,
    }
}

/// Where the transition program reads a full socket: `struct sock`'s common part,
/// `sk_protocol`, and `struct net`'s namespace inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    pub sock: SockLayout,
    pub sk_protocol: u32,
    pub net_inum: u32,
}

pub fn sock_offsets(btf: &KernelBtf) -> Result<SockOffsets, LayoutError> {
    Ok(SockOffsets {
        // `struct inet_sock` starts with its `struct sock`.
        sock: btf.sock_layout("sock", "__sk_common", ("inet_sock", &["inet_sport"]), &[])?,
        sk_protocol: btf
            .offset("sock", &["sk_protocol"], 2..=2)
            .map_err(|e| err(format!("{e} (tcplens needs Linux 5.6 or later)")))?,
        net_inum: btf.offset("net", &["ns", "inum"], 4..=4)?,
    })
}

/// Where a full socket keeps its cgroup v2 and its connection's counters (`filter_cgroup`
/// left 0). The offsets moved between kernels (`tcp_sock` was regrouped by cache line in
/// 6.8; `kernfs_node.id` moved in 6.12), so every one comes from BTF.
pub fn conn_layout(btf: &KernelBtf) -> Result<ConnLayout, LayoutError> {
    let tcp = |path: &[&str], size: usize| btf.offset("tcp_sock", path, size..=size);
    if btf.offset("cgroup", &["self"], 1..=usize::MAX)? != 0 {
        return Err(err("struct cgroup does not start with its `self` css"));
    }
    Ok(ConnLayout {
        sk_cgroup: btf.offset("sock", &["sk_cgrp_data", "cgroup"], 8..=8)?,
        cgroup_kn: btf.offset("cgroup", &["kn"], 8..=8)?,
        kn_id: btf.offset("kernfs_node", &["id"], 8..=8)?,
        cgroup_parent: btf.offset("cgroup", &["self", "parent"], 8..=8)?,
        bytes_acked: tcp(&["bytes_acked"], 8)?,
        bytes_received: tcp(&["bytes_received"], 8)?,
        srtt_us: tcp(&["srtt_us"], 4)?,
        // `struct minmax { struct minmax_sample { u32 t; u32 v; } s[3]; }`: the best is s[0].
        rtt_min: tcp(&["rtt_min", "s"], 24)? + btf.offset("minmax_sample", &["v"], 4..=4)?,
        total_retrans: tcp(&["total_retrans"], 4)?,
        _pad: 0,
        filter_cgroup: 0,
    })
}

/// The addresses of text symbols `names` in /proc/kallsyms text, read up to the line of the
/// last one found (`None`: missing, or hidden without CAP_SYSLOG).
pub fn symbol_addresses(mut kallsyms: impl std::io::BufRead, names: &[&str]) -> Vec<Option<u64>> {
    let mut found: Vec<Option<u64>> = vec![None; names.len()];
    // 100 k+ lines at start-up: one buffer, bytes compared, nothing allocated per line.
    let mut line = Vec::with_capacity(256);
    while matches!(kallsyms.read_until(b'\n', &mut line), Ok(n) if n > 0) {
        let mut f = line
            .split(u8::is_ascii_whitespace)
            .filter(|w| !w.is_empty());
        if let (Some(addr), Some(_kind), Some(sym)) = (f.next(), f.next(), f.next())
            && let Some(i) = names.iter().position(|n| n.as_bytes() == sym)
        {
            found[i] = std::str::from_utf8(addr)
                .ok()
                .and_then(|a| u64::from_str_radix(a, 16).ok())
                .filter(|&a| a != 0);
            if found.iter().all(Option::is_some) {
                break;
            }
        }
        line.clear();
    }
    found
}

/// Why a symbol's address is not there.
pub fn missing_symbol(name: &str) -> LayoutError {
    err(format!(
        "no address for {name} in {KALLSYMS} (reading addresses needs CAP_SYSLOG)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_addresses_from_kallsyms() {
        let text = "ffffffff82003420 t __pfx_tw_timer_handler\nffffffff82003430 t tw_timer_handler\nffffffff82003500 T tw_timer_handler_other\n";
        assert_eq!(
            symbol_addresses(text.as_bytes(), &["tw_timer_handler"]),
            [Some(0xffff_ffff_8200_3430)]
        );
        // Without CAP_SYSLOG, kallsyms shows zeros: no address.
        let hidden = "0000000000000000 t tw_timer_handler\n";
        assert_eq!(
            symbol_addresses(hidden.as_bytes(), &["tw_timer_handler"]),
            [None]
        );
        assert_eq!(symbol_addresses(&b""[..], &["tw_timer_handler"]), [None]);
    }

    /// The running kernel's BTF (every test machine has it: tcplens requires it).
    #[test]
    fn offsets_of_the_running_kernel() {
        let btf = KernelBtf::open(Path::new(VMLINUX_BTF)).expect("kernel BTF");
        let s = sock_offsets(&btf).expect("sock offsets");
        // `struct sock` starts with its `sock_common`, which starts with the addresses.
        assert_eq!((s.sock.daddr, s.sock.rcv_saddr), (0, 4));
        assert_eq!(s.sock.dport, 12);
        assert!(s.sock.sport > s.sock.head, "inet_sport is past sock_common");
        assert_eq!(s.sock.family, 16);
        assert!(s.sock.head > s.sock.cookie && s.sock.head <= MAX_HEAD);
        // This host's 6.18 (shared/notes): every field found, each where BTF says.
        let c = conn_layout(&btf).expect("connection layout");
        assert!(c.sk_cgroup > 0 && c.bytes_acked > 0 && c.rtt_min > 0 && c.total_retrans > 0);
        let t = super::super::timewait::layout_from(&btf, 0xffff_ffff_8200_3430).expect("tw");
        // Mapped (here) or read at once (kernels before 6.15): the same layouts.
        let read = KernelBtf::read(Path::new(VMLINUX_BTF)).expect("kernel BTF, read");
        assert_eq!(conn_layout(&read), Ok(c));
        assert_eq!(
            super::super::timewait::layout_from(&read, 0xffff_ffff_8200_3430),
            Ok(t)
        );
        assert_eq!(sock_offsets(&read), Ok(s));
        assert_eq!(t.handler, 0xffff_ffff_8200_3430);
        // A timewait socket's common part is the same `struct sock_common`.
        assert_eq!(
            (t.sock.daddr, t.sock.cookie, t.sock.net),
            (0, s.sock.cookie, s.sock.net)
        );
        assert!(t.sock.head > t.tw_substate && t.sock.head >= t.sock.sport + 2);
        assert!(btf.offset("sock", &["no_such_member"], 1..=8).is_err());
        assert!(btf.offset("no_such_struct", &["x"], 1..=8).is_err());
    }
}
