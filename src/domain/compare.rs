//! The pure core of drift reconciliation: grants and what Discord says about their
//! members in, drift findings out. No I/O; table-tested below.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::GrantStatus;
use super::Snowflake;

/// A grant as reconcile sees it: its status, what it applied in Discord, what its
/// entitlement asks for, and the customer's linked Discord account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRow {
    pub id: String,
    pub business_id: String,
    pub customer_id: String,
    pub status: GrantStatus,
    pub applied_user: Option<Snowflake>,
    pub applied_guild: Option<Snowflake>,
    pub applied_role: Option<Snowflake>,
    pub entitlement_guild: Option<Snowflake>,
    /// `None`: membership only.
    pub entitlement_role: Option<Snowflake>,
    pub linked_user: Option<Snowflake>,
}

/// Access in one guild: membership, and a role if `role` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    pub user: Snowflake,
    pub guild: Snowflake,
    pub role: Option<Snowflake>,
}

impl GrantRow {
    /// What the grant applied in Discord, if it recorded anything.
    pub fn applied(&self) -> Option<Access> {
        Some(Access {
            user: self.applied_user?,
            guild: self.applied_guild?,
            role: self.applied_role,
        })
    }

    /// What the grant should give: its entitlement's guild and role to the linked user.
    pub fn desired(&self) -> Option<Access> {
        Some(Access {
            user: self.linked_user?,
            guild: self.entitlement_guild?,
            role: self.entitlement_role,
        })
    }

    /// What a `Delivered` grant is checked against: what it applied (what the customer
    /// was given), else what it should give.
    pub fn expected(&self) -> Option<Access> {
        self.applied().or_else(|| self.desired())
    }
}

/// A role that an entitlement gates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatedRole {
    pub business_id: String,
    pub guild: Snowflake,
    pub role: Snowflake,
}

/// What Discord said. A member neither looked up nor in a listed guild is unknown, and
/// the grants that depend on it are not judged.
#[derive(Clone, Debug, Default)]
pub struct DiscordState {
    /// `GET /guilds/{g}/members/{u}` answers: `None` = not a member, else their roles.
    pub members: HashMap<(Snowflake, Snowflake), Option<Vec<Snowflake>>>,
    /// Guilds whose members were listed in full: user → roles, for the members that
    /// hold a gated role of the guild or that a grant names there (no one else matters
    /// to the comparison). A user absent from a listed guild is not a member, or holds
    /// no gated role and is named by no grant.
    pub listed: HashMap<Snowflake, HashMap<Snowflake, Vec<Snowflake>>>,
    /// Roles guildgate found already there when it first gave them, as
    /// `(guild, user, role)` (its holdings): not drift while they stay.
    pub found: HashSet<(Snowflake, Snowflake, Snowflake)>,
}

impl DiscordState {
    /// `Some(None)`: not a member; `Some(Some(roles))`: a member; `None`: unknown.
    pub fn member(&self, guild: Snowflake, user: Snowflake) -> Option<Option<&[Snowflake]>> {
        if let Some(m) = self.members.get(&(guild, user)) {
            return Some(m.as_deref());
        }
        self.listed
            .get(&guild)
            .map(|members| members.get(&user).map(Vec::as_slice))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// A delivered grant whose member lacks the role.
    MissingRole,
    /// A delivered grant whose member is not in the server.
    LeftServer,
    /// A revoked grant whose member still holds what it gave, and no other live grant
    /// (of any customer) gives it.
    StillHolds,
    /// A member holding a gated role without any live grant giving it.
    Ungranted,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::MissingRole => "missing_role",
            DriftKind::LeftServer => "left_server",
            DriftKind::StillHolds => "still_holds",
            DriftKind::Ungranted => "ungranted",
        }
    }
}

/// One drift between guildgate's grants and Discord.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: DriftKind,
    pub business_id: String,
    pub guild_id: Snowflake,
    /// `None`: a membership-only grant.
    pub role_id: Option<Snowflake>,
    pub user_id: Snowflake,
    /// `None` for [`DriftKind::Ungranted`].
    pub grant_id: Option<String>,
}

fn covers(given: &Access, wanted: &Access) -> bool {
    given.user == wanted.user
        && given.guild == wanted.guild
        && (wanted.role.is_none() || given.role == wanted.role)
}

/// Whether a live grant among `grants` (other than `except`) gives `wanted`: by what it
/// applied, or by what its sync is about to apply.
fn given_by_live<'a>(
    grants: impl IntoIterator<Item = &'a GrantRow>,
    except: Option<&str>,
    wanted: &Access,
) -> bool {
    grants.into_iter().any(|g| {
        g.status.is_live()
            && Some(g.id.as_str()) != except
            && [g.applied(), g.desired()]
                .iter()
                .flatten()
                .any(|a| covers(a, wanted))
    })
}

/// Compares grants with Discord. `gated` are the roles entitlements gate; members of
/// the guilds in `discord.listed` holding one without a live grant are `Ungranted`.
/// Findings come sorted by kind, guild, user.
pub fn compare(grants: &[GrantRow], gated: &[GatedRole], discord: &DiscordState) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut by_customer: HashMap<(&str, &str), Vec<&GrantRow>> = HashMap::new();
    for g in grants {
        by_customer
            .entry((g.business_id.as_str(), g.customer_id.as_str()))
            .or_default()
            .push(g);
    }
    let mut still_held: HashSet<(Snowflake, Snowflake, Snowflake)> = HashSet::new();
    for g in grants {
        let finding = |kind, a: Access| Finding {
            kind,
            business_id: g.business_id.clone(),
            guild_id: a.guild,
            role_id: a.role,
            user_id: a.user,
            grant_id: Some(g.id.clone()),
        };
        match g.status {
            GrantStatus::Delivered => {
                let Some(a) = g.expected() else { continue };
                match discord.member(a.guild, a.user) {
                    None => {}
                    Some(None) => out.push(finding(DriftKind::LeftServer, a)),
                    Some(Some(roles)) => {
                        if let Some(role) = a.role
                            && !roles.contains(&role)
                        {
                            out.push(finding(DriftKind::MissingRole, a));
                        }
                    }
                }
            }
            GrantStatus::Revoked => {
                // Only what the syncer has not undone yet: it clears `applied` once done.
                let Some(a) = g.applied() else { continue };
                let Some(Some(roles)) = discord.member(a.guild, a.user) else {
                    continue;
                };
                if a.role.is_some_and(|r| !roles.contains(&r)) {
                    continue;
                }
                // One Discord account can be linked under several customers: any live
                // grant giving the same access explains it.
                if given_by_live(grants, Some(&g.id), &a) {
                    continue;
                }
                if a.role
                    .is_some_and(|r| discord.found.contains(&(a.guild, a.user, r)))
                {
                    continue;
                }
                if let Some(r) = a.role {
                    still_held.insert((a.guild, a.user, r));
                }
                out.push(finding(DriftKind::StillHolds, a));
            }
            GrantStatus::Pending | GrantStatus::Failed => {}
        }
    }
    for (guild, members) in &discord.listed {
        let gated_here: Vec<&GatedRole> = gated.iter().filter(|r| r.guild == *guild).collect();
        if gated_here.is_empty() {
            continue;
        }
        for (user, roles) in members {
            for gr in &gated_here {
                if !roles.contains(&gr.role)
                    || still_held.contains(&(*guild, *user, gr.role))
                    || discord.found.contains(&(*guild, *user, gr.role))
                {
                    continue;
                }
                let wanted = Access {
                    user: *user,
                    guild: *guild,
                    role: Some(gr.role),
                };
                if given_by_live(grants, None, &wanted) {
                    continue;
                }
                out.push(Finding {
                    kind: DriftKind::Ungranted,
                    business_id: gr.business_id.clone(),
                    guild_id: *guild,
                    role_id: Some(gr.role),
                    user_id: *user,
                    grant_id: None,
                });
            }
        }
    }
    out.sort_by(|a, b| {
        (a.kind, a.guild_id, a.user_id, a.role_id, &a.grant_id).cmp(&(
            b.kind,
            b.guild_id,
            b.user_id,
            b.role_id,
            &b.grant_id,
        ))
    });
    // Two gated entitlements of one role give one finding per business; the same
    // member is reported once per (business, role).
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 100;
    const R: u64 = 200;
    const R2: u64 = 201;
    const BIZ: &str = "bus_1";

    fn s(n: u64) -> Snowflake {
        Snowflake::new(n)
    }

    /// A grant of `customer` linked to `user`, for role `role` in G, that applied
    /// what `applied` says (user, role).
    fn grant(
        id: &str,
        customer: &str,
        status: GrantStatus,
        user: u64,
        role: Option<u64>,
        applied: bool,
    ) -> GrantRow {
        GrantRow {
            id: id.into(),
            business_id: BIZ.into(),
            customer_id: customer.into(),
            status,
            applied_user: applied.then(|| s(user)),
            applied_guild: applied.then(|| s(G)),
            applied_role: if applied { role.map(s) } else { None },
            entitlement_guild: Some(s(G)),
            entitlement_role: role.map(s),
            linked_user: Some(s(user)),
        }
    }

    fn gated(role: u64) -> GatedRole {
        GatedRole {
            business_id: BIZ.into(),
            guild: s(G),
            role: s(role),
        }
    }

    fn looked_up(entries: &[(u64, Option<&[u64]>)]) -> DiscordState {
        DiscordState {
            members: entries
                .iter()
                .map(|(u, roles)| {
                    (
                        (s(G), s(*u)),
                        roles.map(|r| r.iter().copied().map(s).collect()),
                    )
                })
                .collect(),
            listed: HashMap::new(),
            found: HashSet::new(),
        }
    }

    fn listed(entries: &[(u64, &[u64])]) -> DiscordState {
        DiscordState {
            members: HashMap::new(),
            listed: [(
                s(G),
                entries
                    .iter()
                    .map(|(u, roles)| (s(*u), roles.iter().copied().map(s).collect()))
                    .collect(),
            )]
            .into(),
            found: HashSet::new(),
        }
    }

    fn kinds(f: &[Finding]) -> Vec<(DriftKind, u64, Option<&str>)> {
        f.iter()
            .map(|f| (f.kind, f.user_id.get(), f.grant_id.as_deref()))
            .collect()
    }

    #[test]
    fn table() {
        use DriftKind::*;
        use GrantStatus::*;
        type Case = (
            &'static str,
            Vec<GrantRow>,
            Vec<GatedRole>,
            DiscordState,
            Vec<(DriftKind, u64, Option<&'static str>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "delivered and holding: no drift",
                vec![grant("g1", "c1", Delivered, 1, Some(R), true)],
                vec![gated(R)],
                looked_up(&[(1, Some(&[R]))]),
                vec![],
            ),
            (
                "delivered, role taken away",
                vec![grant("g1", "c1", Delivered, 1, Some(R), true)],
                vec![],
                looked_up(&[(1, Some(&[R2]))]),
                vec![(MissingRole, 1, Some("g1"))],
            ),
            (
                "delivered, member left",
                vec![grant("g1", "c1", Delivered, 1, Some(R), true)],
                vec![],
                looked_up(&[(1, None)]),
                vec![(LeftServer, 1, Some("g1"))],
            ),
            (
                "membership only, still a member: no drift",
                vec![grant("g1", "c1", Delivered, 1, None, true)],
                vec![],
                looked_up(&[(1, Some(&[]))]),
                vec![],
            ),
            (
                "membership only, left",
                vec![grant("g1", "c1", Delivered, 1, None, true)],
                vec![],
                looked_up(&[(1, None)]),
                vec![(LeftServer, 1, Some("g1"))],
            ),
            (
                "member unknown (read failed): not judged",
                vec![grant("g1", "c1", Delivered, 1, Some(R), true)],
                vec![],
                DiscordState::default(),
                vec![],
            ),
            (
                "delivered, judged from a listing",
                vec![grant("g1", "c1", Delivered, 1, Some(R), true)],
                vec![gated(R)],
                listed(&[(2, &[])]),
                vec![(LeftServer, 1, Some("g1"))],
            ),
            (
                "revoked, not undone, still holding",
                vec![grant("g1", "c1", Revoked, 1, Some(R), true)],
                vec![gated(R)],
                listed(&[(1, &[R])]),
                vec![(StillHolds, 1, Some("g1"))],
            ),
            (
                "revoked, undone (applied cleared): the role is ungranted, not still-held",
                vec![grant("g1", "c1", Revoked, 1, Some(R), false)],
                vec![gated(R)],
                listed(&[(1, &[R])]),
                vec![(Ungranted, 1, None)],
            ),
            (
                "revoked, but another live grant of the customer gives the role",
                vec![
                    grant("g1", "c1", Revoked, 1, Some(R), true),
                    grant("g2", "c1", Delivered, 1, Some(R), true),
                ],
                vec![gated(R)],
                listed(&[(1, &[R])]),
                vec![],
            ),
            (
                "revoked, another live pending grant about to give it",
                vec![
                    grant("g1", "c1", Revoked, 1, Some(R), true),
                    grant("g2", "c1", Pending, 1, Some(R), false),
                ],
                vec![],
                looked_up(&[(1, Some(&[R]))]),
                vec![],
            ),
            (
                "revoked, role already gone: no drift",
                vec![grant("g1", "c1", Revoked, 1, Some(R), true)],
                vec![],
                looked_up(&[(1, Some(&[]))]),
                vec![],
            ),
            (
                "revoked membership-only grant, still a member",
                vec![grant("g1", "c1", Revoked, 1, None, true)],
                vec![],
                looked_up(&[(1, Some(&[]))]),
                vec![(StillHolds, 1, Some("g1"))],
            ),
            (
                "revoked membership-only, another live grant in the guild keeps membership",
                vec![
                    grant("g1", "c1", Revoked, 1, None, true),
                    grant("g2", "c1", Delivered, 1, Some(R), true),
                ],
                vec![],
                looked_up(&[(1, Some(&[R]))]),
                vec![],
            ),
            (
                "another customer's live grant does not keep a revoked one's role",
                vec![
                    grant("g1", "c1", Revoked, 1, Some(R), true),
                    grant("g2", "c2", Delivered, 2, Some(R), true),
                ],
                vec![gated(R)],
                listed(&[(1, &[R]), (2, &[R])]),
                vec![(StillHolds, 1, Some("g1"))],
            ),
            (
                "member holding a gated role without a grant",
                vec![grant("g1", "c1", Delivered, 1, Some(R), true)],
                vec![gated(R)],
                listed(&[(1, &[R]), (3, &[R, R2]), (4, &[R2])]),
                vec![(Ungranted, 3, None)],
            ),
            (
                "failed grant with a link: its role is not ungranted",
                vec![grant("g1", "c1", Failed, 1, Some(R), false)],
                vec![gated(R)],
                listed(&[(1, &[R])]),
                vec![],
            ),
            (
                "pending and failed grants are not checked themselves",
                vec![
                    grant("g1", "c1", Pending, 1, Some(R), false),
                    grant("g2", "c2", Failed, 2, Some(R), false),
                ],
                vec![],
                looked_up(&[(1, None), (2, Some(&[]))]),
                vec![],
            ),
            (
                "no listing (no members intent): no ungranted check",
                vec![grant("g1", "c1", Delivered, 1, Some(R), true)],
                vec![gated(R)],
                looked_up(&[(1, Some(&[R])), (3, Some(&[R]))]),
                vec![],
            ),
            (
                "sorted by kind",
                vec![
                    grant("g1", "c1", Revoked, 1, Some(R), true),
                    grant("g2", "c2", Delivered, 2, Some(R), true),
                    grant("g3", "c3", Delivered, 3, Some(R), true),
                ],
                vec![gated(R)],
                listed(&[(1, &[R]), (2, &[]), (5, &[R])]),
                vec![
                    (MissingRole, 2, Some("g2")),
                    (LeftServer, 3, Some("g3")),
                    (StillHolds, 1, Some("g1")),
                    (Ungranted, 5, None),
                ],
            ),
        ];
        for (name, grants, gated, discord, want) in cases {
            let got = compare(&grants, &gated, &discord);
            assert_eq!(kinds(&got), want, "{name}");
        }
    }

    /// The holdings' rules: an access another customer's grant explains, or one
    /// guildgate found already there, is not drift.
    #[test]
    fn holdings_explain_what_would_look_like_drift() {
        use GrantStatus::*;
        // One Discord account under two customers: one revoked (its removal skipped,
        // since the other holds the role), the other live.
        let got = compare(
            &[
                grant("g1", "c1", Revoked, 1, Some(R), true),
                grant("g2", "c2", Delivered, 1, Some(R), true),
            ],
            &[gated(R)],
            &listed(&[(1, &[R])]),
        );
        assert_eq!(got, vec![]);
        // A role a moderator gave before the purchase, whose grant has ended.
        let mut found = listed(&[(1, &[R])]);
        found.found.insert((s(G), s(1), s(R)));
        assert_eq!(
            compare(
                &[grant("g1", "c1", Revoked, 1, Some(R), false)],
                &[gated(R)],
                &found
            ),
            vec![]
        );
        // Without the holding, it is a role nobody pays for.
        let got = compare(
            &[grant("g1", "c1", Revoked, 1, Some(R), false)],
            &[gated(R)],
            &listed(&[(1, &[R])]),
        );
        assert_eq!(kinds(&got), vec![(DriftKind::Ungranted, 1, None)]);
    }

    #[test]
    fn findings_name_business_guild_role() {
        let got = compare(
            &[grant("g1", "c1", GrantStatus::Delivered, 1, Some(R), true)],
            &[],
            &looked_up(&[(1, Some(&[]))]),
        );
        assert_eq!(
            got,
            vec![Finding {
                kind: DriftKind::MissingRole,
                business_id: BIZ.into(),
                guild_id: s(G),
                role_id: Some(s(R)),
                user_id: s(1),
                grant_id: Some("g1".into()),
            }]
        );
    }
}
