//! Containers from cgroup paths: which runtime's container (and Kubernetes pod) a cgroup v2
//! path names, from the path alone (no call to any runtime or API server).
//!
//! The shapes, as container runtimes and the kubelet name their cgroups (a container's
//! processes may sit in a sub-cgroup of its scope, so any component may name it):
//!
//! - systemd driver: a scope `<prefix><64 hex>.scope`, the prefix `docker-`,
//!   `cri-containerd-`, `crio-` or `libpod-` (Docker, containerd, CRI-O, Podman); under
//!   Kubernetes inside a pod slice `kubepods[-<qos>]-pod<uid>.slice`, the pod UID's `-`
//!   written `_`;
//! - cgroupfs driver: a bare `<64 hex>` directory, under `/docker/` or under a pod directory
//!   `pod<uid>` of `/kubepods[/<qos>]/`, and Podman's `libpod-<64 hex>`;
//! - not containers: the runtimes' monitors (`crio-conmon-…`, `libpod-conmon-…`) and
//!   Podman's own `podman-<pid>.scope`.
//!
//! The innermost container wins (Kubernetes in a Docker container names both).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The runtime that named a container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    Docker,
    Containerd,
    Crio,
    Podman,
    /// A bare container directory under a Kubernetes pod (cgroupfs driver): the runtime
    /// is not in the name.
    Kubernetes,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "cri-o",
            Runtime::Podman => "podman",
            Runtime::Kubernetes => "kubernetes",
        }
    }
}

/// A container, as its cgroup path names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Container {
    pub runtime: Runtime,
    /// The container id: 64 lowercase hex digits.
    pub id: String,
    /// The Kubernetes pod's UID (with its dashes), when the path is under a pod.
    pub pod_uid: Option<String>,
}

/// Scope prefixes of the systemd driver, by runtime; monitors share some of them and are
/// told apart by the id that must follow.
const SCOPES: [(&str, Runtime); 4] = [
    ("docker-", Runtime::Docker),
    ("cri-containerd-", Runtime::Containerd),
    ("crio-", Runtime::Crio),
    ("libpod-", Runtime::Podman),
];

/// The container a cgroup path (relative to the cgroup2 root, or absolute under it) names,
/// if any.
pub fn container_of(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // The innermost container component, and what is above it.
    let (at, runtime, id) = parts.iter().enumerate().rev().find_map(|(i, part)| {
        container_component(part, parts[..i].last().copied()).map(|(r, id)| (i, r, id))
    })?;
    let pod_uid = parts[..at].iter().rev().find_map(|p| pod_uid(p));
    let runtime = match (runtime, &pod_uid) {
        (None, Some(_)) => Runtime::Kubernetes,
        (None, None) => Runtime::Docker, // a bare id under /docker/
        (Some(r), _) => r,
    };
    Some(Container {
        runtime,
        id: id.to_string(),
        pod_uid,
    })
}

/// A path component naming a container: its runtime when the name says (`None` for a
/// bare id, whose runtime the parent tells) and its id. `parent` is the component above.
fn container_component<'a>(
    part: &'a str,
    parent: Option<&str>,
) -> Option<(Option<Runtime>, &'a str)> {
    if let Some(scope) = part.strip_suffix(".scope") {
        return SCOPES.iter().find_map(|&(prefix, runtime)| {
            let id = scope.strip_prefix(prefix)?;
            is_container_id(id).then_some((Some(runtime), id))
        });
    }
    if let Some(id) = part.strip_prefix("libpod-") {
        return is_container_id(id).then_some((Some(Runtime::Podman), id));
    }
    // cgroupfs: a bare id, under /docker/ or a pod directory.
    let bare_parent = parent.is_some_and(|p| p == "docker" || pod_uid(p).is_some());
    (is_container_id(part) && bare_parent).then_some((None, part))
}

/// The pod UID a path component names: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd), given back with dashes.
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(slice) => {
            let rest = slice.strip_prefix("kubepods-")?;
            let rest = rest
                .strip_prefix("burstable-")
                .or_else(|| rest.strip_prefix("besteffort-"))
                .unwrap_or(rest);
            rest.strip_prefix("pod")?.replace('_', "-")
        }
        None => part.strip_prefix("pod")?.to_string(),
    };
    let ok = !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some(uid)
}

/// 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where the cgroup2 hierarchy is mounted: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one (read from /proc/self/mountinfo).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let info = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(io::Error::other)?;
    info.into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount"))
}

/// A cgroup as tcplens shows it: its path under the cgroup2 root, and the container it
/// names (if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupName {
    pub path: String,
    pub container: Option<Container>,
}

/// Cgroup ids (a cgroup directory's inode number on 64-bit kernels: what the kernel keeps
/// in a socket) to their names, from a walk of the cgroup2 mount, walked again when an id
/// is missing (at most once a second: cgroups come and go all the time). A cgroup removed
/// since keeps the name it had. Without a cgroup2 mount (or on replay of another host's
/// file) nothing is named: outputs then show the id alone.
pub struct CgroupNames {
    root: Option<PathBuf>,
    names: HashMap<u64, CgroupName>,
    walked: Option<Instant>,
}

/// How often a missing id may make the index walk the hierarchy again.
const REWALK: Duration = Duration::from_secs(1);

impl CgroupNames {
    /// Names from the cgroup2 hierarchy mounted at `root`.
    pub fn new(root: PathBuf) -> Self {
        CgroupNames {
            root: Some(root),
            names: HashMap::new(),
            walked: None,
        }
    }

    /// Names from this host's cgroup2 hierarchy, if it has one.
    pub fn host() -> Self {
        match cgroup2_mount() {
            Ok(root) => Self::new(root),
            Err(e) => {
                log::debug!("cgroup names unavailable: {e}");
                Self::none()
            }
        }
    }

    /// Names these cgroups, by id and path, and nothing else.
    pub fn known<'a>(paths: impl IntoIterator<Item = (u64, &'a str)>) -> Self {
        let names = paths
            .into_iter()
            .map(|(id, path)| {
                let name = CgroupName {
                    path: path.to_string(),
                    container: container_of(path),
                };
                (id, name)
            })
            .collect();
        CgroupNames {
            root: None,
            names,
            walked: None,
        }
    }

    /// Names nothing.
    pub fn none() -> Self {
        Self::known([])
    }

    /// Cgroup `id`'s name (its path relative to the hierarchy's root, `/` for the root).
    pub fn get(&mut self, id: u64) -> Option<&CgroupName> {
        if id == 0 {
            return None;
        }
        if !self.names.contains_key(&id) && self.walked.is_none_or(|t| t.elapsed() >= REWALK) {
            self.walk();
        }
        self.names.get(&id)
    }

    /// Cgroup `id`'s path, when known.
    pub fn path(&mut self, id: u64) -> Option<&str> {
        self.get(id).map(|n| n.path.as_str())
    }

    fn walk(&mut self) {
        let Some(root) = &self.root else {
            return;
        };
        self.walked = Some(Instant::now());
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue; // removed meanwhile
            };
            self.names.entry(meta.ino()).or_insert_with(|| {
                let path = relative(root, &dir);
                let container = container_of(&path);
                CgroupName { path, container }
            });
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// A cgroup directory's path relative to the cgroup2 root `root` (`/` for the root).
fn relative(root: &std::path::Path, dir: &std::path::Path) -> String {
    dir.strip_prefix(root)
        .map_or_else(|_| "/".to_string(), |r| format!("/{}", r.display()))
}

/// `--cgroup`: a cgroup v2 directory; the kernel keeps its sockets and those of every
/// cgroup below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupFilter {
    /// Its id (inode number).
    pub id: u64,
    /// Its path relative to the cgroup2 root (`/` for the root).
    pub path: String,
}

impl CgroupFilter {
    /// A path to a cgroup v2 directory: absolute (`/sys/fs/cgroup/system.slice`) or
    /// relative to the cgroup2 mount (`system.slice`, `/system.slice`).
    pub fn resolve(arg: &str) -> Result<CgroupFilter, String> {
        let root = cgroup2_mount().map_err(|e| format!("`{arg}`: no cgroup v2 hierarchy ({e})"))?;
        Self::resolve_in(&root, arg)
    }

    fn resolve_in(root: &std::path::Path, arg: &str) -> Result<CgroupFilter, String> {
        let given = std::path::Path::new(arg.trim());
        let dir = if given.starts_with(root) {
            given.to_path_buf()
        } else {
            root.join(given.strip_prefix("/").unwrap_or(given))
        };
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("`{arg}`: {e} (cgroup v2 is mounted at {})", root.display()))?;
        if !dir.starts_with(root) || !dir.join("cgroup.procs").exists() {
            return Err(format!(
                "`{arg}` is not a cgroup v2 directory (cgroup v2 is mounted at {})",
                root.display()
            ));
        }
        let id = std::fs::metadata(&dir)
            .map_err(|e| format!("`{arg}`: {e}"))?
            .ino();
        Ok(CgroupFilter {
            id,
            path: relative(root, &dir),
        })
    }

    /// Whether the filter keeps a socket of cgroup `id` (the kernel's test, for what
    /// sock_diag lists): that cgroup or one below it.
    pub fn keeps(&self, id: u64, names: &mut CgroupNames) -> bool {
        if id == self.id {
            return true;
        }
        if id == 0 {
            return false;
        }
        names.path(id).is_some_and(|p| {
            self.path == "/"
                || p.strip_prefix(self.path.as_str())
                    .is_some_and(|r| r.starts_with('/'))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(runtime: Runtime, id: &str, pod: Option<&str>) -> Container {
        Container {
            runtime,
            id: id.to_string(),
            pod_uid: pod.map(str::to_string),
        }
    }

    /// Real-world paths (sources in the issue-14 facts: Docker docs, containerd, CRI-O,
    /// kubelet, Podman issues and systemd-cgls outputs).
    #[test]
    fn container_runtimes_and_pods_from_real_paths() {
        let docker = "2a55517bd2c9f85d2e1911cb4cd0840a4aa299513af411fb437c0661dd88d11b";
        let containerd = "2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36";
        let static_pod = "2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5";
        let crio = "0ba8ac17e4e7a31fb82279503552fe94e64bab4745bf6fd2ff231e7c8ca8bed0";
        let shim = "57353a2ab1bd38bc5b00500bd4dc9795b6bf0e6e3a15479c474ccb3be605cef8";
        let bare = "823b5a6d9aaa8da5c0ecda3e7cbcd6729673437965dc600ffcb0a2651960f945";
        let bare2 = "2961aa806fbeb848a8de8b64d08666dae15f207102a2d5ca5d6afc06b618453c";
        let podman = "0411a2a82311fbc65b137ca550d5f7e6b6863bc734759be2f515b0b67062d49a";
        let cases: [(String, Container); 12] = [
            (
                format!("/system.slice/docker-{docker}.scope"),
                c(Runtime::Docker, docker, None),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{docker}.scope"
                ),
                c(Runtime::Docker, docker, None),
            ),
            (
                format!("/docker/{docker}"),
                c(Runtime::Docker, docker, None),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-{containerd}.scope"
                ),
                c(
                    Runtime::Containerd,
                    containerd,
                    Some("55c6c714-b240-4dec-9a45-57b61696ab6e"),
                ),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/cri-containerd-{static_pod}.scope"
                ),
                c(
                    Runtime::Containerd,
                    static_pod,
                    Some("8daa50c3a64c9ff60bb9eab7b44b56fd"),
                ),
            ),
            (
                // Kubernetes (CRI-O) inside a Docker container: the innermost wins.
                format!(
                    "/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-{crio}.scope"
                ),
                c(
                    Runtime::Crio,
                    crio,
                    Some("2ca4a155-3599-498d-bb9d-4446693fa3ea"),
                ),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pode4193b51_e5f8_4348_90b3_5423cb74e0d1.slice/docker-{shim}.scope"
                ),
                c(
                    Runtime::Docker,
                    shim,
                    Some("e4193b51-e5f8-4348-90b3-5423cb74e0d1"),
                ),
            ),
            (
                format!("/kubepods/burstable/pod89f4f2cb511c3b0b7e5272cff5ec37bf/{bare}"),
                c(
                    Runtime::Kubernetes,
                    bare,
                    Some("89f4f2cb511c3b0b7e5272cff5ec37bf"),
                ),
            ),
            (
                format!("/kubepods/burstable/pod3cac3187-5e77-11ea-9c85-2c600c7b896a/{bare2}"),
                c(
                    Runtime::Kubernetes,
                    bare2,
                    Some("3cac3187-5e77-11ea-9c85-2c600c7b896a"),
                ),
            ),
            (
                format!("/machine.slice/libpod-{podman}.scope"),
                c(Runtime::Podman, podman, None),
            ),
            (
                // A container's processes in a sub-cgroup of its scope.
                format!("/machine.slice/libpod-{podman}.scope/container"),
                c(Runtime::Podman, podman, None),
            ),
            (
                format!("/libpod_parent/libpod-{podman}"),
                c(Runtime::Podman, podman, None),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(container_of(&path), Some(want), "{path}");
        }
    }

    #[test]
    fn monitors_services_and_pods_without_a_container_are_none() {
        for path in [
            "/",
            "/init.scope",
            "/system.slice/containerd.service",
            "/system.slice/crio-conmon-e0c85fe7644a858988d9687c2e0736a7d31922740d0f3e001c6b2e0aa7e5f528.scope",
            "/machine.slice/libpod-conmon-0411a2a82311fbc65b137ca550d5f7e6b6863bc734759be2f515b0b67062d49a.scope",
            "/user.slice/user-10000.slice/user@10000.service/user.slice/podman-239302.scope",
            "/user.slice/user-1000.slice/session-4.scope",
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-f22f14d2-3d44-4304-9879-3fdd0df7b08e.scope",
            "/kubepods/besteffort/pod13e0457a-bb6a-4190-a67b-fd34cfb441c9",
            // A 64-hex directory anywhere else is not taken for a container.
            "/system.slice/823b5a6d9aaa8da5c0ecda3e7cbcd6729673437965dc600ffcb0a2651960f945",
        ] {
            assert_eq!(container_of(path), None, "{path}");
        }
    }
}
