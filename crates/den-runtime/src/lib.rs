//! den's sprite runtime.
//!
//! [`image`] builds and caches the Debian userland every sprite starts from and
//! makes it usable as the shared, read-only lower layer of an overlayfs inside
//! a sprite's user namespace.

pub mod image;
