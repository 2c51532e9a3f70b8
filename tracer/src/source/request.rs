//! The listen path on the source side: where the timer programs (`tracer-ebpf/src/request.rs`)
//! find a request socket's fields. A request (`struct request_sock`) starts with a
//! `struct sock_common` (`__req_common`), as a timewait socket does; its local port is that
//! common part's `skc_num` (host order), its listener `skc_listener`.

use tracer_common::{RequestLayout, SockLayout};

use super::btf::{KernelBtf, LayoutError};

/// The request path's layout, with `reqsk_timer_handler`'s address; `sock` is the full
/// socket's layout (where a listener keeps its cookie).
pub(super) fn layout_from(
    btf: &KernelBtf,
    handler: u64,
    sock: &SockLayout,
) -> Result<RequestLayout, LayoutError> {
    let rq = "request_sock";
    let num_retrans = btf.offset(rq, &["num_retrans"], 1..=1)?;
    let listener = btf.offset(rq, &["__req_common", "skc_listener"], 8..=8)?;
    Ok(RequestLayout {
        handler,
        rsk_timer: btf.offset(rq, &["rsk_timer"], 40..=64)?,
        num_retrans,
        listener,
        listener_cookie: sock.cookie,
        sock: btf.sock_layout(
            rq,
            "__req_common",
            (rq, &["__req_common", "skc_num"]),
            &[(num_retrans, 1), (listener, 8)],
        )?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::btf::{VMLINUX_BTF, sock_offsets};

    /// The running kernel's request layout: `struct request_sock` starts with the same
    /// `struct sock_common` as a socket, and everything read lies in the copied head.
    #[test]
    fn request_layout_of_the_running_kernel() {
        let btf = KernelBtf::open(Path::new(VMLINUX_BTF)).expect("kernel BTF");
        let s = sock_offsets(&btf).expect("sock offsets").sock;
        let r = layout_from(&btf, 0xffff_ffff_8200_af30, &s).expect("request layout");
        assert_eq!(r.handler, 0xffff_ffff_8200_af30);
        assert_eq!(
            (r.sock.daddr, r.sock.rcv_saddr, r.sock.dport, r.sock.family),
            (s.daddr, s.rcv_saddr, s.dport, s.family)
        );
        // skc_num follows skc_dport.
        assert_eq!(r.sock.sport, r.sock.dport + 2);
        assert_eq!((r.sock.cookie, r.sock.net), (s.cookie, s.net));
        assert_eq!(r.listener_cookie, s.cookie);
        assert!(r.sock.head > r.num_retrans && r.sock.head >= r.listener + 8);
        assert!(r.rsk_timer > r.listener);
    }
}
