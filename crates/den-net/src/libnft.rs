//! Applying nft scripts in process, through libnftables, the library the `nft` tool is a thin
//! front end of.
//!
//! Spawning `nft -f -` costs 15–25 ms on a busy two-core host (process start, dynamic linking
//! of half a dozen libraries, a fresh ruleset cache), and every sprite boot and teardown
//! applies one script: it was the largest single cost of a boot's network phase. The library
//! call applies the same script, with the same parser, the same all-or-nothing transaction
//! and the same error text, in about 0.2 ms.
//!
//! The library is opened at run time (`dlopen`), not linked: building den needs no
//! libnftables headers, and a host without the library (or with an ABI we don't expect)
//! still works through the `nft` binary ([`Nft::Binary`]).

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::ptr::NonNull;

use crate::{NetError, cmd};

/// `libnftables.so.1`'s entry points (stable since nftables 0.9.3; see `libnftables(3)`).
struct Api {
    ctx_free: unsafe extern "C" fn(*mut c_void),
    run_cmd_from_buffer: unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int,
    get_error_buffer: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    /// Keeps the library mapped while the pointers above are in use.
    _lib: libloading::Library,
}

/// One libnftables context. Not `Send`: it lives on the one thread that applies nft
/// changes ([`crate::nftq`]).
pub(crate) struct LibNft {
    api: Api,
    ctx: NonNull<c_void>,
}

/// How scripts are applied: in process when libnftables could be opened, else by the binary.
pub(crate) enum Nft {
    Lib(LibNft),
    Binary,
}

impl Nft {
    /// libnftables if it loads and answers, else the `nft` binary (logged once).
    pub(crate) fn open() -> Nft {
        match LibNft::open() {
            Ok(lib) => Nft::Lib(lib),
            Err(why) => {
                tracing::info!(reason = %why, "libnftables unavailable: applying firewall changes with the nft binary");
                Nft::Binary
            }
        }
    }

    /// Apply `script` as one transaction (all or nothing), like `nft -f -`.
    ///
    /// A context keeps its view of the ruleset between transactions (which
    /// is what makes it fast) and checks it against the kernel's generation
    /// first. Should that view still be stale (seen here rarely, with other
    /// processes changing their own tables at the same moment: nft then
    /// refuses our script with "No such file or directory"), the failed
    /// transaction applied nothing, and it is tried once more on a fresh
    /// context, as a new `nft` process would.
    pub(crate) fn apply(&mut self, script: &str) -> Result<(), NetError> {
        let Nft::Lib(lib) = self else {
            return cmd::nft(script);
        };
        let Err(first) = lib.apply(script) else {
            return Ok(());
        };
        match LibNft::open() {
            Ok(fresh) => *lib = fresh,
            Err(_) => return Err(first),
        }
        let again = lib.apply(script);
        if again.is_ok() {
            tracing::debug!(error = %first, "nft transaction applied on a fresh context");
        }
        again
    }
}

impl LibNft {
    pub(crate) fn open() -> Result<LibNft, String> {
        // SAFETY: loading runs the library's initialisers; libnftables' only set up its own
        // state. Each symbol is given the exact C signature from libnftables.h, and the
        // pointers are only used while `_lib` keeps the library mapped.
        unsafe {
            let lib = libloading::Library::new("libnftables.so.1").map_err(|e| e.to_string())?;
            let ctx_new: unsafe extern "C" fn(c_uint) -> *mut c_void =
                *lib.get(b"nft_ctx_new\0").map_err(|e| e.to_string())?;
            let buffer_output: unsafe extern "C" fn(*mut c_void) -> c_int =
                *lib.get(b"nft_ctx_buffer_output\0").map_err(|e| e.to_string())?;
            let buffer_error: unsafe extern "C" fn(*mut c_void) -> c_int =
                *lib.get(b"nft_ctx_buffer_error\0").map_err(|e| e.to_string())?;
            let api = Api {
                ctx_free: *lib.get(b"nft_ctx_free\0").map_err(|e| e.to_string())?,
                run_cmd_from_buffer: *lib.get(b"nft_run_cmd_from_buffer\0").map_err(|e| e.to_string())?,
                get_error_buffer: *lib
                    .get(b"nft_ctx_get_error_buffer\0")
                    .map_err(|e| e.to_string())?,
                _lib: lib,
            };
            // NFT_CTX_DEFAULT: the same context the nft tool makes.
            let ctx = NonNull::new(ctx_new(0)).ok_or("nft_ctx_new failed")?;
            // Output (nothing, for the scripts den applies) and errors go to buffers instead of
            // den's stdout/stderr; the error buffer becomes the error message.
            if buffer_output(ctx.as_ptr()) != 0 || buffer_error(ctx.as_ptr()) != 0 {
                (api.ctx_free)(ctx.as_ptr());
                return Err("nft_ctx_buffer_output/error failed".into());
            }
            Ok(LibNft { api, ctx })
        }
    }

    fn apply(&mut self, script: &str) -> Result<(), NetError> {
        let failed = |stderr: String| NetError::Command {
            cmd: "nft -f - (libnftables)".into(),
            stderr,
            stdin: Some(script.to_string()),
        };
        let text = CString::new(script).map_err(|_| failed("the script contains a NUL byte".into()))?;
        // SAFETY: `ctx` is a live context owned by self (freed only in Drop), `text` is a
        // NUL-terminated string that outlives the call, and the error buffer is a string the
        // library owns until the next command on this context, copied out before that.
        unsafe {
            let rc = (self.api.run_cmd_from_buffer)(self.ctx.as_ptr(), text.as_ptr());
            // Read (which empties it) after every command, so warnings can't pile up in it;
            // turned into a message only on failure.
            let err = (self.api.get_error_buffer)(self.ctx.as_ptr());
            if rc == 0 {
                return Ok(());
            }
            let message = if err.is_null() {
                String::new()
            } else {
                CStr::from_ptr(err).to_string_lossy().trim().to_string()
            };
            Err(failed(if message.is_empty() {
                format!("libnftables returned {rc}")
            } else {
                message
            }))
        }
    }
}

impl Drop for LibNft {
    fn drop(&mut self) {
        // SAFETY: the context was made by nft_ctx_new and is freed once, here.
        unsafe { (self.api.ctx_free)(self.ctx.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs as root, with nftables installed (as every den-net test).
    #[test]
    fn library_applies_a_transaction_and_reports_errors_like_the_binary() {
        let mut lib = LibNft::open().expect("libnftables.so.1 loads on the CI machine");
        let table = format!("denlibnft{}", std::process::id());
        lib.apply(&format!("add table inet {table}\nadd chain inet {table} c\n"))
            .unwrap();
        let listed = cmd::run("nft", &["list", "table", "inet", &table], None).unwrap();
        assert!(listed.contains("chain c"), "{listed}");

        // A bad script applies nothing: the good first line must not land either.
        let err = lib
            .apply(&format!(
                "add chain inet {table} d\nadd rule inet {table} nosuch drop\n"
            ))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("No such file or directory"),
            "nft's own error text: {text}"
        );
        let listed = cmd::run("nft", &["list", "table", "inet", &table], None).unwrap();
        assert!(!listed.contains("chain d"), "all or nothing: {listed}");

        // Through `Nft`: a refused script is refused again on a fresh context
        // (same error), and the context that replaced the first keeps working.
        let mut nft = Nft::Lib(lib);
        let again = nft
            .apply(&format!("add rule inet {table} nosuch drop\n"))
            .unwrap_err();
        assert!(again.to_string().contains("No such file or directory"), "{again}");
        nft.apply(&format!("add chain inet {table} e\n")).unwrap();
        let listed = cmd::run("nft", &["list", "table", "inet", &table], None).unwrap();
        assert!(listed.contains("chain e"), "{listed}");

        nft.apply(&format!("delete table inet {table}\n")).unwrap();
        assert!(cmd::run("nft", &["list", "table", "inet", &table], None).is_err());
    }
}
