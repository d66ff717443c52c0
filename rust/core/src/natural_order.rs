//! The order of sibling modules rebuilt from tensor names, without allocating per comparison.
//!
//! Siblings go in definition order as transformers models are laid out: embeddings, then
//! encoder/decoder/layers, then norms, then output heads; numbered entries in numeric order. Within a
//! rank, names compare naturally (digit runs as numbers: "layer2" before "layer10").

use std::cmp::Ordering;

/// Where a sibling goes in definition order: (group, number for numbered entries). Names compare
/// ASCII-case-insensitively, as transformers' names are lower case but checkpoints need not be.
pub(crate) fn rank(name: &str) -> (u8, u64) {
    if let Ok(n) = name.parse::<u64>() {
        return (2, n);
    }
    let is = |word: &str| name.eq_ignore_ascii_case(word);
    let group =
        if contains_ignore_case(name, "embed") || ["wte", "wpe", "shared", "word_embeddings"].into_iter().any(is) {
            0
        } else if is("encoder") {
            1
        } else if contains_ignore_case(name, "norm") || starts_with_ignore_case(name, "ln_f") {
            3
        } else if ["lm_head", "head", "output", "classifier", "score"].into_iter().any(is) {
            4
        } else {
            2
        };
    (group, 0)
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// Name order within a rank: the names cut into runs of digits and of other bytes; digit runs compare
/// as numbers (by length, then digits: no overflow on long runs), other runs byte by byte, and a name
/// that is a prefix of the other in runs comes first.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (Runs(a.as_bytes()), Runs(b.as_bytes()));
    loop {
        match (x.next(), y.next()) {
            (Some(cx), Some(cy)) => {
                let both_digits = cx[0].is_ascii_digit() && cy[0].is_ascii_digit();
                let order = if both_digits {
                    cx.len().cmp(&cy.len()).then_with(|| cx.cmp(cy))
                } else {
                    cx.cmp(cy)
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
        }
    }
}

/// The maximal runs of digits and of non-digits of a byte string.
struct Runs<'a>(&'a [u8]);

impl<'a> Iterator for Runs<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let first = *self.0.first()?;
        let digits = first.is_ascii_digit();
        let end = self
            .0
            .iter()
            .position(|b| b.is_ascii_digit() != digits)
            .unwrap_or(self.0.len());
        let (run, rest) = self.0.split_at(end);
        self.0 = rest;
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint_reference::{natural_cmp as reference_natural_cmp, rank as reference_rank};
    use proptest::prelude::*;

    #[test]
    fn numbered_names_sort_naturally_and_groups_follow_the_model() {
        let mut names = vec!["layer10", "layer2", "layer1", "block_b", "block_a"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, vec!["block_a", "block_b", "layer1", "layer2", "layer10"]);
        let mut siblings = vec![
            "lm_head",
            "Final_LayerNorm",
            "layers",
            "Embed_Tokens",
            "encoder",
            "10",
            "9",
        ];
        siblings.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| natural_cmp(a, b)));
        assert_eq!(
            siblings,
            vec![
                "Embed_Tokens",
                "encoder",
                "layers",
                "9",
                "10",
                "Final_LayerNorm",
                "lm_head"
            ]
        );
    }

    proptest! {
        #[test]
        fn agrees_with_the_allocating_reference(
            a in "[a-zA-Z0-9_é]{0,8}|(embed|norm|ln_f|head|encoder|wte)[0-9a-z]{0,3}",
            b in "[a-zA-Z0-9_é]{0,8}|(Embed|NORM|LN_F|Head|lm_head|score)[0-9A-Z]{0,3}",
        ) {
            prop_assert_eq!(rank(&a), reference_rank(&a));
            prop_assert_eq!(rank(&b), reference_rank(&b));
            prop_assert_eq!(natural_cmp(&a, &b), reference_natural_cmp(&a, &b));
            prop_assert_eq!(natural_cmp(&a, &a), Ordering::Equal);
        }
    }
}
