//! Friendly random sprite names (`brave-otter-4821`): DNS labels, easy to
//! say out loud, and unlikely to collide.

use rand::Rng;
use rand::seq::IndexedRandom;

const ADJECTIVES: &[&str] = &[
    "amber", "bold", "brave", "calm", "clever", "cosy", "crisp", "eager", "fuzzy", "gentle", "happy",
    "jolly", "keen", "lucky", "mellow", "nimble", "plucky", "quiet", "rapid", "sunny", "swift", "tidy",
    "witty", "zesty",
];
const NOUNS: &[&str] = &[
    "badger", "beaver", "cedar", "comet", "falcon", "fern", "fox", "heron", "lynx", "maple", "marten",
    "otter", "owl", "panda", "pine", "puffin", "raven", "river", "robin", "stoat", "tern", "vole", "walrus",
    "wren",
];

pub fn random_name() -> String {
    let mut r = rand::rng();
    format!(
        "{}-{}-{:04}",
        ADJECTIVES.choose(&mut r).unwrap_or(&"den"),
        NOUNS.choose(&mut r).unwrap_or(&"sprite"),
        r.random_range(0..10000)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_dns_labels() {
        for _ in 0..100 {
            let n = super::random_name();
            assert!(n.len() <= 63 && !n.starts_with('-') && !n.ends_with('-'), "{n}");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{n}"
            );
        }
    }
}
