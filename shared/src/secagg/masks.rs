//! Stage 2 and unmasking: the AES-CTR mask PRG, a site's mask plan and the
//! coordinator's plan for the masks that do not cancel, and the roster and unmask checks.

use super::*;

/// The masks one party adds to a vector: PRG keys with their signs.
#[derive(Clone)]
pub struct MaskPlan {
    pub(super) terms: Vec<([u8; 32], bool)>,
}

impl std::fmt::Debug for MaskPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskPlan").field("terms", &self.terms.len()).finish()
    }
}

pub(super) fn self_mask_key(seed: &[u8; 32], session: &[u8; 32]) -> [u8; 32] {
    derive_key(seed, session, b"self mask")
}

pub(super) fn pair_mask_key(shared: &[u8; 32], session: &[u8; 32]) -> [u8; 32] {
    derive_key(shared, session, b"pair mask")
}

impl MaskPlan {
    /// Round 2 at site `me`: PRG(b) plus, for every other v ∈ U2, +PRG(s_uv) if
    /// me < v and −PRG(s_uv) otherwise ([BIK+17] Fig. 4, MaskedInputCollection).
    pub fn for_site(
        params: &SessionParams,
        secrets: &SiteSecrets,
        me: &str,
        u2: &[(String, AdvertisedKeys)],
    ) -> Result<Self> {
        let session = params.session_id();
        let mut terms = vec![(self_mask_key(&secrets.self_seed, &session), false)];
        let neighbours = params.neighbours_of(me);
        for (v, keys) in u2.iter().filter(|(v, _)| v != me && neighbours.contains(v)) {
            let shared = agree(&secrets.mask, &keys.mask, v)?;
            terms.push((pair_mask_key(&shared, &session), me > v.as_str()));
        }
        Ok(MaskPlan { terms })
    }

    /// Round 3 at the coordinator: the masks left in Σ_{u∈U3} y_u, to subtract. Pairs
    /// inside U3 cancel; left are PRG(b_u) for u ∈ U3 and ±PRG(s_uv) for u ∈ U3,
    /// v ∈ U2∖U3, rebuilt from v's reconstructed masking key.
    pub fn for_unmasking(
        params: &SessionParams,
        survivors: &[(String, AdvertisedKeys)],
        self_seeds: &HashMap<String, [u8; 32]>,
        dropped_keys: &HashMap<String, [u8; 32]>,
    ) -> Result<Self> {
        let session = params.session_id();
        let mut terms = Vec::new();
        for (u, keys) in survivors {
            let seed = self_seeds
                .get(u)
                .ok_or_else(|| SecAggError::Roster(format!("no self-mask seed for survivor {u}")))?;
            // Subtract what u added: its self mask ...
            terms.push((self_mask_key(seed, &session), true));
            // ... and its pair masks with each dropped neighbour v (u added + if u < v).
            let neighbours = params.neighbours_of(u);
            for (v, v_key) in dropped_keys.iter().filter(|(v, _)| neighbours.contains(v)) {
                let shared = agree(&StaticSecret::from(*v_key), &keys.mask, u)?;
                let u_added_plus = u.as_str() < v.as_str();
                terms.push((pair_mask_key(&shared, &session), u_added_plus));
            }
        }
        Ok(MaskPlan { terms })
    }

    /// Applies every term to `values`, the words from `offset` on. Large vectors are
    /// split into one contiguous piece per core (the keystream seeks to each piece's
    /// offset), so every thread streams its own cache-friendly slice.
    pub fn apply(&self, offset: u64, values: &mut [u32]) {
        let threads = crate::cores();
        if threads == 1 || values.len() < 1 << 16 {
            for (key, subtract) in &self.terms {
                add_keystream(key, offset, values, *subtract);
            }
            return;
        }
        // Pieces start on PRG block boundaries, so no block is expanded twice.
        let piece = values.len().div_ceil(threads).next_multiple_of(PRG_BLOCK_WORDS);
        std::thread::scope(|scope| {
            for (i, slice) in values.chunks_mut(piece).enumerate() {
                let start = offset + (i * piece) as u64;
                scope.spawn(move || {
                    for (key, subtract) in &self.terms {
                        add_keystream(key, start, slice, *subtract);
                    }
                });
            }
        });
    }

    pub fn len(&self) -> usize {
        self.terms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

/// A site's checks of the coordinator's rosters ([BIK+17] Fig. 4, and the issue's
/// misbehaving-coordinator rules): U3 ⊆ U2 ⊆ U1 ⊆ roster, no repeats, each ≥ t.
pub fn check_rosters(params: &SessionParams, stages: &[&[String]]) -> Result<()> {
    let mut outer: BTreeSet<&str> = params.roster.iter().map(String::as_str).collect();
    for (k, stage) in stages.iter().enumerate() {
        let set: BTreeSet<&str> = stage.iter().map(String::as_str).collect();
        if set.len() != stage.len() {
            return Err(SecAggError::Roster(format!("U{} lists a site twice", k + 1)));
        }
        if let Some(extra) = set.iter().find(|s| !outer.contains(*s)) {
            return Err(SecAggError::Roster(format!(
                "U{} holds {extra}, which is not in U{}",
                k + 1,
                k
            )));
        }
        if set.len() < params.threshold as usize {
            return Err(SecAggError::Roster(format!(
                "U{} has {} sites, fewer than t = {}",
                k + 1,
                set.len(),
                params.threshold
            )));
        }
        outer = set;
    }
    Ok(())
}

/// A site's check of an unmask request: survivors and dropped partition U2, the
/// survivors are at least t, and `me` is a survivor. What to reveal follows: the
/// self-seed share for survivors, the masking-key share for dropped sites, never both.
pub fn check_unmask_request(
    params: &SessionParams,
    u2: &[String],
    survivors: &[String],
    dropped: &[String],
    me: &str,
) -> Result<()> {
    let s: BTreeSet<&str> = survivors.iter().map(String::as_str).collect();
    let d: BTreeSet<&str> = dropped.iter().map(String::as_str).collect();
    if s.len() != survivors.len() || d.len() != dropped.len() {
        return Err(SecAggError::Roster("the unmask request lists a site twice".into()));
    }
    if let Some(both) = s.intersection(&d).next() {
        return Err(SecAggError::Roster(format!(
            "{both} is listed as both survivor and dropped: revealing both of its shares would expose its input"
        )));
    }
    let all: BTreeSet<&str> = s.union(&d).copied().collect();
    let u2_set: BTreeSet<&str> = u2.iter().map(String::as_str).collect();
    if all != u2_set {
        return Err(SecAggError::Roster(
            "survivors and dropped sites must together be U2".into(),
        ));
    }
    if s.len() < params.threshold as usize {
        return Err(SecAggError::Roster(format!(
            "{} survivors, fewer than t = {}",
            s.len(),
            params.threshold
        )));
    }
    if !s.contains(me) {
        return Err(SecAggError::Roster(format!("{me} is not among the survivors")));
    }
    Ok(())
}
