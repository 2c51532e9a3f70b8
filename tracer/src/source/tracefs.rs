//! tracefs: finding (or mounting) it, and reading a tracepoint's record layout from its
//! `format` file so that no kernel's offsets are compiled in.

use std::path::{Path, PathBuf};

use thiserror::Error;
use tracer_common::{MAX_RECORD_SIZE, TracepointLayout};

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({0}); mount it with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    Mount(nix::Error),
    #[error(
        "this kernel has no tracepoint sock:inet_sock_set_state ({path}: {source}); tcplens needs Linux 4.16 or later"
    )]
    NoTracepoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
}

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn looks_mounted(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// The tracefs mount point, mounting tracefs at `/sys/kernel/tracing` when it is not
/// mounted anywhere (as bpftool does). Must run before aya looks for tracefs: aya caches its
/// first answer.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    if let Some(found) = CANDIDATES.iter().map(Path::new).find(|d| looks_mounted(d)) {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(CANDIDATES[0]);
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(TracefsError::Mount)?;
    Ok(target.to_path_buf())
}

/// One field of a tracepoint record: `offset` and `size` in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parses the fields of a tracepoint `format` file, in order: `(name, field)`.
pub fn parse_format(text: &str) -> Vec<(String, Field)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?;
            let mut parts = decl.split(';').map(str::trim);
            let decl = parts.next()?;
            let mut offset = None;
            let mut size = None;
            for kv in parts {
                if let Some(v) = kv.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = kv.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            // "__u8 saddr[4]" -> "saddr"; "const void * skaddr" -> "skaddr"
            let name = decl.rsplit([' ', '*']).next()?;
            let name = name.split('[').next()?.to_string();
            Some((
                name,
                Field {
                    offset: offset?,
                    size: size?,
                },
            ))
        })
        .collect()
}

/// The layout of `sock:inet_sock_set_state` from its format text, with every field the
/// kernel program reads checked for presence and size.
pub fn inet_sock_set_state_layout(
    text: &str,
    path: &Path,
) -> Result<TracepointLayout, TracefsError> {
    let fields = parse_format(text);
    let err = |what: String| TracefsError::Format {
        path: path.to_path_buf(),
        what,
    };
    let get = |name: &str, sizes: &[u32]| -> Result<u32, TracefsError> {
        let (_, f) = fields
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| err(format!("no field `{name}`")))?;
        if !sizes.contains(&f.size) {
            return Err(err(format!(
                "field `{name}` has size {}, expected {sizes:?}",
                f.size
            )));
        }
        Ok(f.offset)
    };
    let record_size = fields
        .iter()
        .map(|(_, f)| f.offset + f.size)
        .max()
        .ok_or_else(|| err("no fields".into()))?;
    if record_size > MAX_RECORD_SIZE {
        return Err(err(format!(
            "record is {record_size} bytes, more than the {MAX_RECORD_SIZE} tcplens reads"
        )));
    }
    Ok(TracepointLayout {
        record_size,
        skaddr: get("skaddr", &[8])?,
        oldstate: get("oldstate", &[4])?,
        newstate: get("newstate", &[4])?,
        sport: get("sport", &[2])?,
        dport: get("dport", &[2])?,
        family: get("family", &[2])?,
        protocol: get("protocol", &[2])?,
        saddr: get("saddr", &[4])?,
        daddr: get("daddr", &[4])?,
        saddr_v6: get("saddr_v6", &[16])?,
        daddr_v6: get("daddr_v6", &[16])?,
    })
}

/// Reads the layout of `sock:inet_sock_set_state` from tracefs at `root`.
pub fn read_inet_sock_set_state(root: &Path) -> Result<TracepointLayout, TracefsError> {
    let path = root.join("events/sock/inet_sock_set_state/format");
    let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::NoTracepoint {
        path: path.clone(),
        source,
    })?;
    inet_sock_set_state_layout(&text, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file of Linux 6.18, as read on this project's machines.
    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s ...\"
";

    #[test]
    fn parses_the_6_18_layout() {
        let l = inet_sock_set_state_layout(FORMAT_6_18, Path::new("format")).expect("valid");
        assert_eq!(
            l,
            TracepointLayout {
                record_size: 72,
                skaddr: 8,
                oldstate: 16,
                newstate: 20,
                sport: 24,
                dport: 26,
                family: 28,
                protocol: 30,
                saddr: 32,
                daddr: 36,
                saddr_v6: 40,
                daddr_v6: 56,
            }
        );
    }

    #[test]
    fn follows_moved_fields() {
        // A hypothetical kernel that put `family` first: the offsets follow the file.
        let moved = FORMAT_6_18
            .replace("__u16 family;\toffset:28", "__u16 family;\toffset:72")
            .replace("__u16 protocol;\toffset:30", "__u16 protocol;\toffset:74");
        let l = inet_sock_set_state_layout(&moved, Path::new("format")).expect("valid");
        assert_eq!((l.family, l.protocol, l.record_size), (72, 74, 76));
    }

    #[test]
    fn missing_or_resized_fields_are_errors() {
        let missing = FORMAT_6_18.replace("skaddr", "sk");
        let e = inet_sock_set_state_layout(&missing, Path::new("f")).unwrap_err();
        assert_eq!(e.to_string(), "f: no field `skaddr`");
        let resized =
            FORMAT_6_18.replace("sport;\toffset:24;\tsize:2", "sport;\toffset:24;\tsize:4");
        let e = inet_sock_set_state_layout(&resized, Path::new("f")).unwrap_err();
        assert_eq!(e.to_string(), "f: field `sport` has size 4, expected [2]");
        let e = inet_sock_set_state_layout("garbage", Path::new("f")).unwrap_err();
        assert_eq!(e.to_string(), "f: no fields");
    }
}
