//! What Discord calls make it match one grant: a pure function of the grant's state,
//! its entitlement, the customer's linked account, what Discord said about the member,
//! what other live grants hold (of any customer or business: one Discord account can be
//! linked under several) and what guildgate found already there. No I/O; table-tested
//! below.
//!
//! guildgate takes away only what it gave: an access it found already there (a member
//! who joined before buying, a role a moderator gave) is never removed, and an access
//! another live grant still holds is never removed either.
//!
//! The syncer runs the calls in order. When an answer shows the member differs from
//! what was assumed (already a member, or no longer one), it plans again with that
//! knowledge; every call is idempotent, so a repeated or late job is harmless.

use super::Snowflake;

/// Access in one guild: membership, and a role if `role` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub user: Snowflake,
    pub guild: Snowflake,
    pub role: Option<Snowflake>,
}

/// What is known about the linked user in the entitlement's guild.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Not asked (a first delivery just tries to add; Discord says if they were in).
    Unknown,
    Absent,
    Present {
        roles: Vec<Snowflake>,
    },
}

/// Everything a plan depends on.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The grant is not revoked.
    pub live: bool,
    pub guild: Snowflake,
    /// `None`: membership only.
    pub role: Option<Snowflake>,
    /// The customer's linked Discord account, if they authorized.
    pub linked_user: Option<Snowflake>,
    /// What this grant holds: what it applied, and what it recorded it was about to
    /// apply (an account switch or a role change a crash interrupted).
    pub held: &'a [Access],
    pub member: MemberState,
    /// What other live grants applied (or recorded they are applying), of any customer
    /// or business: never taken away.
    pub others: &'a [Access],
    /// Accesses guildgate found already there when it first gave them (`role: None`:
    /// the membership): never taken away.
    pub found: &'a [Access],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `PUT /guilds/{g}/members/{u}` with the user's token (and the role).
    AddMember {
        guild: Snowflake,
        user: Snowflake,
        role: Option<Snowflake>,
    },
    AddRole {
        guild: Snowflake,
        user: Snowflake,
        role: Snowflake,
    },
    RemoveRole {
        guild: Snowflake,
        user: Snowflake,
        role: Snowflake,
    },
    /// Kick: undoes a membership-only grant.
    RemoveMember { guild: Snowflake, user: Snowflake },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub calls: Vec<Call>,
    /// What the grant has applied once the calls succeeded.
    pub applied_after: Option<Access>,
    /// The grant is delivered once the calls succeeded.
    pub delivers: bool,
    /// Live, but the customer has not linked an account yet: nothing to do.
    pub awaiting_link: bool,
    /// Accesses this grant lets go of, and whether another grant keeps each.
    pub released: Vec<(Access, bool)>,
}

/// The calls that make Discord match the grant.
pub fn plan(i: &Input<'_>) -> Plan {
    let desired = match (i.live, i.linked_user) {
        (true, Some(user)) => Some(Access {
            user,
            guild: i.guild,
            role: i.role,
        }),
        _ => None,
    };
    let mut calls = Vec::new();
    // Deliver first: on an account switch the customer is never left with nothing
    // because removing the old account's access failed.
    if let Some(d) = desired {
        match (&i.member, d.role) {
            (MemberState::Unknown | MemberState::Absent, role) => calls.push(Call::AddMember {
                guild: d.guild,
                user: d.user,
                role,
            }),
            (MemberState::Present { roles }, Some(role)) if !roles.contains(&role) => {
                calls.push(Call::AddRole {
                    guild: d.guild,
                    user: d.user,
                    role,
                })
            }
            (MemberState::Present { .. }, _) => {}
        }
    }
    let keeps: Vec<&Access> = i.others.iter().chain(desired.as_ref()).collect();
    let found = |a: &Access| i.found.contains(a);
    let mut released = Vec::new();
    for a in i.held.iter().filter(|a| Some(**a) != desired) {
        if released.iter().any(|(r, _)| r == a) {
            continue;
        }
        let kept = match a.role {
            Some(role) => keeps
                .iter()
                .any(|o| o.user == a.user && o.guild == a.guild && o.role == Some(role)),
            // Any other access in the guild needs the membership.
            None => keeps.iter().any(|o| o.user == a.user && o.guild == a.guild),
        };
        released.push((*a, kept));
        if kept || found(a) {
            continue;
        }
        calls.push(match a.role {
            Some(role) => Call::RemoveRole {
                guild: a.guild,
                user: a.user,
                role,
            },
            None => Call::RemoveMember {
                guild: a.guild,
                user: a.user,
            },
        });
    }
    Plan {
        calls,
        applied_after: desired,
        delivers: desired.is_some(),
        awaiting_link: i.live && i.linked_user.is_none(),
        released,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Snowflake {
        Snowflake::new(n)
    }
    const G: u64 = 100;
    const R: u64 = 200;
    const U1: u64 = 1;
    const U2: u64 = 2;

    fn acc(user: u64, role: Option<u64>) -> Access {
        Access {
            user: s(user),
            guild: s(G),
            role: role.map(s),
        }
    }

    fn input<'a>(
        live: bool,
        role: Option<u64>,
        linked: Option<u64>,
        applied: Option<Access>,
        member: MemberState,
        others: &'a [Access],
    ) -> Input<'a> {
        Input {
            live,
            guild: s(G),
            role: role.map(s),
            linked_user: linked.map(s),
            held: Box::leak(applied.into_iter().collect::<Vec<_>>().into_boxed_slice()),
            member,
            others,
            found: &[],
        }
    }

    #[test]
    fn table() {
        use Call::*;
        use MemberState::*;
        let present = |roles: &[u64]| Present {
            roles: roles.iter().copied().map(s).collect(),
        };
        let other_same_role = [acc(U1, Some(R))];
        let other_membership = [acc(U1, None)];
        let cases: Vec<(&str, Input, Vec<Call>, Option<Access>)> = vec![
            (
                "pending without link: nothing",
                input(true, Some(R), None, None, Unknown, &[]),
                vec![],
                None,
            ),
            (
                "first delivery: add with role",
                input(true, Some(R), Some(U1), None, Unknown, &[]),
                vec![AddMember {
                    guild: s(G),
                    user: s(U1),
                    role: Some(s(R)),
                }],
                Some(acc(U1, Some(R))),
            ),
            (
                "already a member: add the role",
                input(true, Some(R), Some(U1), None, present(&[]), &[]),
                vec![AddRole {
                    guild: s(G),
                    user: s(U1),
                    role: s(R),
                }],
                Some(acc(U1, Some(R))),
            ),
            (
                "member holding the role: nothing",
                input(
                    true,
                    Some(R),
                    Some(U1),
                    Some(acc(U1, Some(R))),
                    present(&[R]),
                    &[],
                ),
                vec![],
                Some(acc(U1, Some(R))),
            ),
            (
                "membership only, member: nothing",
                input(true, None, Some(U1), None, present(&[]), &[]),
                vec![],
                Some(acc(U1, None)),
            ),
            (
                "membership only, absent: add",
                input(true, None, Some(U1), None, Absent, &[]),
                vec![AddMember {
                    guild: s(G),
                    user: s(U1),
                    role: None,
                }],
                Some(acc(U1, None)),
            ),
            (
                "revoke: remove the role",
                input(
                    false,
                    Some(R),
                    Some(U1),
                    Some(acc(U1, Some(R))),
                    Unknown,
                    &[],
                ),
                vec![RemoveRole {
                    guild: s(G),
                    user: s(U1),
                    role: s(R),
                }],
                None,
            ),
            (
                "revoke membership only: kick",
                input(false, None, Some(U1), Some(acc(U1, None)), Unknown, &[]),
                vec![RemoveMember {
                    guild: s(G),
                    user: s(U1),
                }],
                None,
            ),
            (
                "revoke, another grant gives the role: keep",
                input(
                    false,
                    Some(R),
                    Some(U1),
                    Some(acc(U1, Some(R))),
                    Unknown,
                    &other_same_role,
                ),
                vec![],
                None,
            ),
            (
                "revoke membership, another grant has a role there: keep",
                input(
                    false,
                    None,
                    Some(U1),
                    Some(acc(U1, None)),
                    Unknown,
                    &other_same_role,
                ),
                vec![],
                None,
            ),
            (
                "revoke role, another grant gives membership only: remove the role",
                input(
                    false,
                    Some(R),
                    Some(U1),
                    Some(acc(U1, Some(R))),
                    Unknown,
                    &other_membership,
                ),
                vec![RemoveRole {
                    guild: s(G),
                    user: s(U1),
                    role: s(R),
                }],
                None,
            ),
            (
                "revoke never delivered: nothing",
                input(false, Some(R), Some(U1), None, Unknown, &[]),
                vec![],
                None,
            ),
            (
                "account switch: deliver to the new, then remove from the old",
                input(
                    true,
                    Some(R),
                    Some(U2),
                    Some(acc(U1, Some(R))),
                    Unknown,
                    &[],
                ),
                vec![
                    AddMember {
                        guild: s(G),
                        user: s(U2),
                        role: Some(s(R)),
                    },
                    RemoveRole {
                        guild: s(G),
                        user: s(U1),
                        role: s(R),
                    },
                ],
                Some(acc(U2, Some(R))),
            ),
            (
                "role changed on the entitlement: add new, remove old",
                input(
                    true,
                    Some(R),
                    Some(U1),
                    Some(acc(U1, Some(999))),
                    present(&[999]),
                    &[],
                ),
                vec![
                    AddRole {
                        guild: s(G),
                        user: s(U1),
                        role: s(R),
                    },
                    RemoveRole {
                        guild: s(G),
                        user: s(U1),
                        role: s(999),
                    },
                ],
                Some(acc(U1, Some(R))),
            ),
        ];
        for (name, i, calls, after) in cases {
            let p = plan(&i);
            assert_eq!(p.calls, calls, "{name}");
            assert_eq!(p.applied_after, after, "{name}");
            assert_eq!(p.delivers, after.is_some(), "{name}");
        }
    }

    /// Who else holds an access, and what was there before guildgate.
    #[test]
    fn takes_away_only_what_it_gave_and_nobody_else_holds() {
        use Call::*;
        use MemberState::*;
        let revoke =
            |held: &'static [Access], others: &'static [Access], found: &'static [Access]| Input {
                live: false,
                guild: s(G),
                role: Some(s(R)),
                linked_user: Some(s(U1)),
                held,
                member: Unknown,
                others,
                found,
            };
        let role_u1: &'static [Access] = Box::leak(Box::new([acc(U1, Some(R))]));
        let member_u1: &'static [Access] = Box::leak(Box::new([acc(U1, None)]));
        let remove_role = RemoveRole {
            guild: s(G),
            user: s(U1),
            role: s(R),
        };
        type Released = Vec<(Access, bool)>;
        let cases: Vec<(&str, Input, Vec<Call>, Released)> = vec![
            (
                "a role a moderator gave before the purchase stays",
                revoke(role_u1, &[], role_u1),
                vec![],
                vec![(acc(U1, Some(R)), false)],
            ),
            (
                "a member who was there before buying is not kicked",
                Input {
                    role: None,
                    ..revoke(member_u1, &[], member_u1)
                },
                vec![],
                vec![(acc(U1, None), false)],
            ),
            (
                "a member guildgate added is kicked",
                Input {
                    role: None,
                    ..revoke(member_u1, &[], &[])
                },
                vec![RemoveMember {
                    guild: s(G),
                    user: s(U1),
                }],
                vec![(acc(U1, None), false)],
            ),
            (
                "two customers, one Discord account: the other's grant keeps the role",
                revoke(role_u1, role_u1, &[]),
                vec![],
                vec![(acc(U1, Some(R)), true)],
            ),
            (
                "two products of one business on one server: the other keeps the role",
                revoke(role_u1, role_u1, &[]),
                vec![],
                vec![(acc(U1, Some(R)), true)],
            ),
            (
                "a server that moved to another business: the first one's live grant keeps it",
                revoke(role_u1, role_u1, &[]),
                vec![],
                vec![(acc(U1, Some(R)), true)],
            ),
            (
                "the last holder goes: the role guildgate added goes",
                revoke(role_u1, &[], &[]),
                vec![remove_role],
                vec![(acc(U1, Some(R)), false)],
            ),
            (
                "membership only beside a role grant: the membership stays",
                Input {
                    role: None,
                    ..revoke(member_u1, role_u1, &[])
                },
                vec![],
                vec![(acc(U1, None), true)],
            ),
            (
                "an interrupted account switch: both accounts held, the old one released",
                Input {
                    live: true,
                    linked_user: Some(s(U2)),
                    member: present(&[R]),
                    ..revoke(
                        Box::leak(Box::new([acc(U1, Some(R)), acc(U2, Some(R))])),
                        &[],
                        &[],
                    )
                },
                vec![remove_role],
                vec![(acc(U1, Some(R)), false)],
            ),
            (
                "an account switch whose old account another holding keeps",
                Input {
                    live: true,
                    linked_user: Some(s(U2)),
                    member: present(&[R]),
                    ..revoke(role_u1, role_u1, &[])
                },
                vec![],
                vec![(acc(U1, Some(R)), true)],
            ),
        ];
        for (name, i, calls, released) in cases {
            let p = plan(&i);
            assert_eq!(p.calls, calls, "{name}");
            assert_eq!(p.released, released, "{name}");
        }
    }

    fn present(roles: &[u64]) -> MemberState {
        MemberState::Present {
            roles: roles.iter().copied().map(s).collect(),
        }
    }

    #[test]
    fn awaiting_link_only_when_live() {
        assert!(plan(&input(true, Some(R), None, None, Unknown, &[])).awaiting_link);
        assert!(!plan(&input(false, Some(R), None, None, Unknown, &[])).awaiting_link);
    }

    use MemberState::Unknown;
}
