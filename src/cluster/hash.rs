//! Which partition a stream name falls in, and which live node should own each partition.
//! Both are fixed functions of their inputs, the same on every node and every build.

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: spreads FNV's low-entropy high bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The partition of a stream name, `0..partitions`.
pub fn partition(name: &str, partitions: u32) -> u32 {
    (mix(fnv1a(name.as_bytes())) % u64::from(partitions.max(1))) as u32
}

/// The owner of every partition `0..partitions` among `nodes`: rendezvous (highest random
/// weight) preferences under a
/// cap of ⌈partitions / nodes⌉ each, so that no node holds more than its even share rounded
/// up (with 64 partitions on 3 nodes: 20 to 22 each, where rendezvous alone gave 14 to 30). Pairs (partition, node) are taken from the strongest preference down, each partition
/// going to its most preferred node that still has room: a joining node takes the partitions
/// that prefer it most, and few others move. The same on every node for the same live set
/// (ties broken by name).
pub fn assignment<'a>(partitions: u32, nodes: &[&'a str]) -> Vec<Option<&'a str>> {
    let mut nodes: Vec<&str> = nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    let mut owners = vec![None; partitions as usize];
    if nodes.is_empty() {
        return owners;
    }
    let cap = (partitions as usize).div_ceil(nodes.len());
    let mut pairs: Vec<(u64, u32, usize)> = Vec::with_capacity(partitions as usize * nodes.len());
    for p in 0..partitions {
        for (i, n) in nodes.iter().enumerate() {
            pairs.push((weight(p, n), p, i));
        }
    }
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let mut held = vec![0usize; nodes.len()];
    for (_, p, i) in pairs {
        let slot = &mut owners[p as usize];
        if slot.is_none() && held[i] < cap {
            *slot = Some(nodes[i]);
            held[i] += 1;
        }
    }
    owners
}

fn weight(partition: u32, node: &str) -> u64 {
    mix(fnv1a(node.as_bytes()) ^ mix(u64::from(partition) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_names_evenly() {
        let mut counts = [0usize; 16];
        for i in 0..16_000 {
            counts[partition(&format!("stream-{i}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_assignment_is_even_and_a_joining_node_moves_few_others() {
        let count = |a: &[Option<&str>], n: &str| a.iter().filter(|o| **o == Some(n)).count();
        let three = assignment(64, &["a", "b", "c"]);
        for n in ["a", "b", "c"] {
            assert!((20..=22).contains(&count(&three, n)), "{n}: {three:?}");
        }
        assert_eq!(three, assignment(64, &["c", "a", "b"]), "order of nodes");
        let four = assignment(64, &["a", "b", "c", "d"]);
        for n in ["a", "b", "c", "d"] {
            assert_eq!(count(&four, n), 16, "{n}: {four:?}");
        }
        let moved = three.iter().zip(&four).filter(|(x, y)| x != y).count();
        let to_new = three
            .iter()
            .zip(&four)
            .filter(|(x, y)| x != y && **y == Some("d"))
            .count();
        assert_eq!(to_new, 16, "the new node gets its share");
        assert!(
            moved - to_new <= 6,
            "{} partitions moved between old nodes",
            moved - to_new
        );
        // A node leaving: only its partitions and a few to even out.
        let two = assignment(64, &["a", "c"]);
        let theirs = three.iter().filter(|x| **x != Some("b")).count();
        let kept = three
            .iter()
            .zip(&two)
            .filter(|(x, y)| **x != Some("b") && x == y)
            .count();
        assert!(
            kept + 6 >= theirs,
            "{kept} of the {theirs} partitions of a and c stayed"
        );
        assert!(assignment(8, &[]).iter().all(Option::is_none));
    }
}
