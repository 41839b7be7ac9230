//! FNV-1a: a tiny hash whose value is the same in every build and on every machine, for
//! names derived from content or paths (unlike `DefaultHasher`, which may change).

/// A 64-bit FNV-1a hasher.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// The FNV-1a hash of `bytes`.
pub fn fnv64(bytes: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut hasher = Fnv::default();
    hasher.write(bytes);
    hasher.finish()
}
