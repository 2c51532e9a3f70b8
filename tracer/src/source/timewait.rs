//! What the timewait programs need from the running kernel, found at start-up: the address
//! of `tw_timer_handler` (/proc/kallsyms), the record layouts of the `timer:*` tracepoints
//! (tracefs), the struct offsets of the timewait socket (the kernel's BTF) and HZ (the
//! kernel config). Any of it missing means no TIME_WAIT tracking, never a wrong offset.

use std::path::Path;

use btf_rs::{Btf, Type};
use thiserror::Error;
use tracer_common::{MAX_TW_READ, TimewaitLayout};

use super::tracefs::{Field, parse_format};

pub const KALLSYMS: &str = "/proc/kallsyms";
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why TIME_WAIT tracking is not available on this kernel (tcplens runs on without it).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Unavailable(pub String);

fn unavailable(what: impl Into<String>) -> Unavailable {
    Unavailable(what.into())
}

/// Everything the timewait tracking needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitSetup {
    pub layout: TimewaitLayout,
    /// The kernel's tick rate: timer `expires` are in jiffies of 1/HZ s.
    pub hz: u32,
}

/// Finds the layout on the running kernel (tracefs mounted at `tracefs`).
pub fn discover(tracefs: &Path) -> Result<TimewaitSetup, Unavailable> {
    let kallsyms =
        std::fs::read_to_string(KALLSYMS).map_err(|e| unavailable(format!("{KALLSYMS}: {e}")))?;
    let handler = symbol_address(&kallsyms, "tw_timer_handler")?;
    let format = |name: &str| -> Result<Vec<(String, Field)>, Unavailable> {
        let path = tracefs.join("events/timer").join(name).join("format");
        std::fs::read_to_string(&path)
            .map(|t| parse_format(&t))
            .map_err(|e| {
                unavailable(format!(
                    "no tracepoint timer:{name} ({}: {e})",
                    path.display()
                ))
            })
    };
    let start = format("timer_start")?;
    let cancel = format("timer_cancel")?;
    let expire = format("timer_expire_entry")?;
    let btf = Btf::from_file(VMLINUX_BTF)
        .map_err(|e| unavailable(format!("no kernel BTF ({VMLINUX_BTF}: {e})")))?;
    let hz = kernel_hz()?;
    let mut layout = TimewaitLayout {
        handler,
        start_timer: record_field(&start, "timer_start", "timer", 8)?,
        start_function: record_field(&start, "timer_start", "function", 8)?,
        start_expires: record_field(&start, "timer_start", "expires", 8)?,
        start_now: record_field(&start, "timer_start", "now", 8)?,
        cancel_timer: record_field(&cancel, "timer_cancel", "timer", 8)?,
        expire_timer: record_field(&expire, "timer_expire_entry", "timer", 8)?,
        expire_function: record_field(&expire, "timer_expire_entry", "function", 8)?,
        expire_now: record_field(&expire, "timer_expire_entry", "now", 8)?,
        ..TimewaitLayout::EMPTY
    };
    let tw = "inet_timewait_sock";
    let skc = "sock_common";
    layout.tw_timer = member(&btf, tw, "tw_timer", 40..=64)?.0;
    layout.tw_substate = member(&btf, tw, "tw_substate", 1..=1)?.0;
    layout.timer_expires = member(&btf, "timer_list", "expires", 8..=8)?.0;
    layout.timer_function = member(&btf, "timer_list", "function", 8..=8)?.0;
    let common = member(&btf, tw, "__tw_common", 1..=usize::MAX)?.0;
    let at = |name: &str, size: usize| -> Result<u32, Unavailable> {
        Ok(common + member(&btf, skc, name, size..=size)?.0)
    };
    layout.skc_daddr = at("skc_daddr", 4)?;
    layout.skc_rcv_saddr = at("skc_rcv_saddr", 4)?;
    layout.skc_dport = at("skc_dport", 2)?;
    layout.skc_num = at("skc_num", 2)?;
    layout.skc_family = at("skc_family", 2)?;
    layout.skc_v6_daddr = at("skc_v6_daddr", 16)?;
    layout.skc_v6_rcv_saddr = at("skc_v6_rcv_saddr", 16)?;
    layout.read_size = [
        (layout.skc_daddr, 4),
        (layout.skc_rcv_saddr, 4),
        (layout.skc_dport, 2),
        (layout.skc_num, 2),
        (layout.skc_family, 2),
        (layout.skc_v6_daddr, 16),
        (layout.skc_v6_rcv_saddr, 16),
        (layout.tw_substate, 1),
    ]
    .into_iter()
    .map(|(off, size)| off + size)
    .max()
    .unwrap_or(0);
    if layout.read_size > MAX_TW_READ {
        return Err(unavailable(format!(
            "the timewait socket fields end at byte {}, past the {MAX_TW_READ} tcplens reads",
            layout.read_size
        )));
    }
    Ok(TimewaitSetup { layout, hz })
}

/// The address of a text symbol in /proc/kallsyms text. Without root the kernel shows
/// zeros, which count as missing.
pub fn symbol_address(kallsyms: &str, name: &str) -> Result<u64, Unavailable> {
    kallsyms
        .lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (addr, _kind, sym) = (f.next()?, f.next()?, f.next()?);
            (sym == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .filter(|&a| a != 0)
        .ok_or_else(|| unavailable(format!("no address for {name} in {KALLSYMS}")))
}

fn record_field(
    fields: &[(String, Field)],
    tracepoint: &str,
    name: &str,
    size: u32,
) -> Result<u32, Unavailable> {
    match fields.iter().find(|(n, _)| n == name) {
        Some((_, f)) if f.size == size => Ok(f.offset),
        Some((_, f)) => Err(unavailable(format!(
            "timer:{tracepoint} field `{name}` has size {}, expected {size}",
            f.size
        ))),
        None => Err(unavailable(format!(
            "timer:{tracepoint} has no field `{name}`"
        ))),
    }
}

/// Byte offset and size of `field` in struct `ty`, looking into anonymous struct and union
/// members (where `sock_common` keeps its addresses and ports).
pub fn member(
    btf: &Btf,
    ty: &str,
    field: &str,
    sizes: std::ops::RangeInclusive<usize>,
) -> Result<(u32, usize), Unavailable> {
    let types = btf
        .resolve_types_by_name(ty)
        .map_err(|e| unavailable(format!("no struct {ty} in the kernel BTF: {e}")))?;
    let found = types.iter().find_map(|t| match t {
        Type::Struct(s) => find_member(btf, s, field, 0),
        _ => None,
    });
    let (bits, size) =
        found.ok_or_else(|| unavailable(format!("no member {ty}.{field} in the kernel BTF")))?;
    if bits % 8 != 0 || !sizes.contains(&size) {
        return Err(unavailable(format!(
            "{ty}.{field} is {size} bytes at bit {bits}, not what tcplens reads"
        )));
    }
    Ok((bits / 8, size))
}

/// (bit offset, byte size) of `field` in `s`, searching anonymous members recursively.
fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str, base: u32) -> Option<(u32, usize)> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = btf.resolve_chained_type(m).ok()?;
        let offset = base + m.bit_offset();
        if name == field {
            return Some((offset, type_size(btf, &ty)?));
        }
        if name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = &ty
            && let Some(hit) = find_member(btf, inner, field, offset)
        {
            return Some(hit);
        }
    }
    None
}

/// Size in bytes of a type, through typedefs and qualifiers.
fn type_size(btf: &Btf, ty: &Type) -> Option<usize> {
    let mut ty = ty.clone();
    for _ in 0..16 {
        match &ty {
            Type::Int(i) => return Some(i.size()),
            Type::Ptr(_) => return Some(8),
            Type::Struct(s) | Type::Union(s) => return Some(s.size()),
            Type::Enum(e) => return Some(e.size()),
            Type::Array(a) => {
                let elem = btf.resolve_chained_type(a).ok()?;
                return Some(a.len() * type_size(btf, &elem)?);
            }
            Type::Typedef(t) => ty = btf.resolve_chained_type(t).ok()?,
            Type::Volatile(t) => ty = btf.resolve_chained_type(t).ok()?,
            Type::Const(t) => ty = btf.resolve_chained_type(t).ok()?,
            Type::Restrict(t) => ty = btf.resolve_chained_type(t).ok()?,
            Type::TypeTag(t) => ty = btf.resolve_chained_type(t).ok()?,
            _ => return None,
        }
    }
    None
}

/// CONFIG_HZ of the running kernel (/proc/config.gz, or /boot/config-$(uname -r)).
fn kernel_hz() -> Result<u32, Unavailable> {
    let config = procfs::kernel_config()
        .map_err(|e| unavailable(format!("kernel config unreadable, so HZ is unknown: {e}")))?;
    match config.get("CONFIG_HZ") {
        Some(procfs::ConfigSetting::Value(v)) => v
            .parse()
            .ok()
            .filter(|&hz| hz > 0)
            .ok_or_else(|| unavailable(format!("CONFIG_HZ={v} is not a tick rate"))),
        _ => Err(unavailable("CONFIG_HZ missing from the kernel config")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_addresses_from_kallsyms() {
        let text = "ffffffff82003420 t __pfx_tw_timer_handler\nffffffff82003430 t tw_timer_handler\nffffffff82003500 T tw_timer_handler_other\n";
        assert_eq!(
            symbol_address(text, "tw_timer_handler"),
            Ok(0xffff_ffff_8200_3430)
        );
        // Without root, kallsyms shows zeros: no address.
        let hidden = "0000000000000000 t tw_timer_handler\n";
        assert!(symbol_address(hidden, "tw_timer_handler").is_err());
        assert!(symbol_address("", "tw_timer_handler").is_err());
    }
}
