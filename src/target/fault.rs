//! Fault injection policy: which requests fail or are delayed, decided from a seed.
//!
//! Pure: parsing and decisions only. The data plane asks [`Policy::decide`] once per request
//! and applies the [`Decision`] (an error reply instead of the I/O, and/or a ring timeout
//! before it).
//!
//! # Rule grammar (CLI `--fault`, config `faults = [...]`, control socket `faults`)
//!
//! ```text
//! RULE   := KIND ':' OP [ ':' PARAM ( ',' PARAM )* ]
//! KIND   := error | delay
//! OP     := read | write | flush | trim | zero | cache | block_status | any
//! PARAM  := errno=EIO|ENOSPC|EPERM|EINVAL|ENOMEM|EOVERFLOW|ESHUTDOWN   (error; default EIO)
//!         | p=PROBABILITY           each matching request, with this probability (default 1)
//!         | every=K                 every K-th matching request
//!         | after=N                 only after N matching requests have passed
//!         | count=N                 at most N injections, then the rule is spent
//!         | range=START-END         only requests overlapping bytes [START, END)
//!         | ms=MILLIS               delay: fixed
//!         | min=MILLIS,max=MILLIS   delay: uniform in [min, max]
//! ```
//!
//! Examples: `error:write:errno=EIO,p=0.01`, `error:any:after=1000,count=1`,
//! `delay:read:min=1,max=20`, `error:read:range=0-1048576,errno=EIO`.
//!
//! # Reproducibility
//!
//! Every random choice comes from one generator per export seeded with [`Policy::seed`];
//! requests are numbered in the order the export sees them, and each injection is reported
//! with that number so a failing run can be replayed with the same seed and workload.

use std::time::Duration;

use crate::target::proto::NbdErrno;

/// Most rules one export may carry.
pub const RULES_MAX: usize = 64;

/// The commands a rule can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    Zero,
    /// NBD_CMD_CACHE.
    Cache,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
    /// Any of them.
    Any,
}

impl FaultOp {
    fn parse(text: &str) -> Result<FaultOp, String> {
        Ok(match text {
            "read" => FaultOp::Read,
            "write" => FaultOp::Write,
            "flush" => FaultOp::Flush,
            "trim" => FaultOp::Trim,
            "zero" | "write_zeroes" => FaultOp::Zero,
            "cache" => FaultOp::Cache,
            "block_status" => FaultOp::BlockStatus,
            "any" => FaultOp::Any,
            other => return Err(format!("unknown command '{other}' in fault rule")),
        })
    }

    fn name(self) -> &'static str {
        match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::Flush => "flush",
            FaultOp::Trim => "trim",
            FaultOp::Zero => "zero",
            FaultOp::Cache => "cache",
            FaultOp::BlockStatus => "block_status",
            FaultOp::Any => "any",
        }
    }

    fn matches(self, op: FaultOp) -> bool {
        self == FaultOp::Any || self == op
    }
}

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Effect {
    /// Reply with this error instead of doing the I/O.
    Error(NbdErrno),
    /// Delay the request by a fixed time.
    Delay(Duration),
    /// Delay the request by a uniform time in [min, max].
    DelayUniform(Duration, Duration),
}

/// One rule: a command filter, a trigger and an effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Which commands it looks at.
    pub op: FaultOp,
    /// What it does.
    pub effect: Effect,
    /// Probability of firing on a matching request (after the other triggers).
    pub probability: f64,
    /// Fire on every K-th matching request (1 = each).
    pub every: u64,
    /// Ignore the first N matching requests.
    pub after: u64,
    /// Stop after this many injections (`u64::MAX` = never).
    pub count: u64,
    /// Only requests overlapping this byte range.
    pub range: Option<(u64, u64)>,
    matched: u64,
    fired: u64,
}

impl Rule {
    /// Parses one rule (see the module docs for the grammar).
    pub fn parse(text: &str) -> Result<Rule, String> {
        let mut parts = text.trim().splitn(3, ':');
        let kind = parts.next().unwrap_or_default();
        let op = FaultOp::parse(
            parts
                .next()
                .ok_or_else(|| format!("rule '{text}' has no command"))?,
        )?;
        let mut rule = Rule {
            op,
            effect: Effect::Error(NbdErrno::Io),
            probability: 1.0,
            every: 1,
            after: 0,
            count: u64::MAX,
            range: None,
            matched: 0,
            fired: 0,
        };
        let (mut delay_ms, mut min_ms, mut max_ms) = (None, None, None);
        for param in parts
            .next()
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = param
                .split_once('=')
                .ok_or_else(|| format!("parameter '{param}' needs a value"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("bad number in '{param}'"))
            };
            match key {
                "errno" => rule.effect = Effect::Error(parse_errno(value)?),
                "p" => {
                    rule.probability = value
                        .parse::<f64>()
                        .ok()
                        .filter(|p| (0.0..=1.0).contains(p))
                        .ok_or_else(|| format!("p must be within 0..=1 in '{param}'"))?;
                }
                "every" => rule.every = number()?.max(1),
                "after" => rule.after = number()?,
                "count" => rule.count = number()?,
                "range" => {
                    let (start, end) = value
                        .split_once('-')
                        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                        .filter(|(a, b)| a < b)
                        .ok_or_else(|| {
                            format!("range must be START-END with START < END: '{param}'")
                        })?;
                    rule.range = Some((start, end));
                }
                "ms" => delay_ms = Some(number()?),
                "min" => min_ms = Some(number()?),
                "max" => max_ms = Some(number()?),
                other => return Err(format!("unknown parameter '{other}' in rule '{text}'")),
            }
        }
        match kind {
            "error" => {
                if delay_ms.or(min_ms).or(max_ms).is_some() {
                    return Err(format!("ms/min/max belong to delay rules: '{text}'"));
                }
            }
            "delay" => {
                rule.effect = match (delay_ms, min_ms, max_ms) {
                    (Some(ms), None, None) => Effect::Delay(Duration::from_millis(ms)),
                    (None, Some(min), Some(max)) if min <= max => {
                        Effect::DelayUniform(Duration::from_millis(min), Duration::from_millis(max))
                    }
                    _ => return Err(format!("delay rule needs ms=, or min= and max=: '{text}'")),
                };
            }
            other => return Err(format!("rule kind must be error or delay, not '{other}'")),
        }
        Ok(rule)
    }

    fn render(&self) -> String {
        let mut text = match self.effect {
            Effect::Error(errno) => format!("error:{}:errno={}", self.op.name(), errno_name(errno)),
            Effect::Delay(d) => format!("delay:{}:ms={}", self.op.name(), d.as_millis()),
            Effect::DelayUniform(a, b) => {
                format!(
                    "delay:{}:min={},max={}",
                    self.op.name(),
                    a.as_millis(),
                    b.as_millis()
                )
            }
        };
        if self.probability < 1.0 {
            text += &format!(",p={}", self.probability);
        }
        if self.every > 1 {
            text += &format!(",every={}", self.every);
        }
        if self.after > 0 {
            text += &format!(",after={}", self.after);
        }
        if self.count != u64::MAX {
            text += &format!(",count={}", self.count);
        }
        if let Some((start, end)) = self.range {
            text += &format!(",range={start}-{end}");
        }
        text
    }
}

fn parse_errno(text: &str) -> Result<NbdErrno, String> {
    Ok(match text.to_ascii_uppercase().as_str() {
        "EIO" => NbdErrno::Io,
        "ENOSPC" => NbdErrno::NoSpc,
        "EPERM" => NbdErrno::Perm,
        "EINVAL" => NbdErrno::Inval,
        "ENOMEM" => NbdErrno::NoMem,
        "EOVERFLOW" => NbdErrno::Overflow,
        "ESHUTDOWN" => NbdErrno::Shutdown,
        other => {
            return Err(format!(
                "errno must be EIO, ENOSPC, EPERM, EINVAL, ENOMEM, EOVERFLOW or ESHUTDOWN, not '{other}'"
            ));
        }
    })
}

fn errno_name(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::Io => "EIO",
        NbdErrno::NoSpc => "ENOSPC",
        NbdErrno::Perm => "EPERM",
        NbdErrno::Inval => "EINVAL",
        NbdErrno::NoMem => "ENOMEM",
        NbdErrno::Overflow => "EOVERFLOW",
        NbdErrno::Shutdown => "ESHUTDOWN",
        _ => "EIO",
    }
}

/// A whole-device state that overrides the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceState {
    /// Rules apply.
    #[default]
    Normal,
    /// Writes, trims and zeroes fail with EPERM (the device went read-only).
    ReadOnly,
    /// Every command fails with EIO.
    Failing,
}

impl DeviceState {
    /// Parses `normal`, `readonly` or `failing`.
    pub fn parse(text: &str) -> Result<DeviceState, String> {
        match text {
            "normal" => Ok(DeviceState::Normal),
            "readonly" | "read-only" => Ok(DeviceState::ReadOnly),
            "failing" => Ok(DeviceState::Failing),
            other => Err(format!(
                "state must be normal, readonly or failing, not '{other}'"
            )),
        }
    }
}

/// What the data plane does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Decision {
    /// Reply with this error instead of doing the I/O.
    pub error: Option<NbdErrno>,
    /// Wait this long first (on a ring timeout, never a sleep).
    pub delay: Option<Duration>,
    /// The request's number in this export's sequence (for logs and replay).
    pub sequence: u64,
}

/// An export's fault policy: rules, device state and the seeded generator.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    state: DeviceState,
    seed: u64,
    rng: fastrand::Rng,
    sequence: u64,
    injected: u64,
}

impl Policy {
    /// A policy with `rules`, seeded with `seed`.
    pub fn new(rules: Vec<Rule>, seed: u64) -> Result<Policy, String> {
        if rules.len() > RULES_MAX {
            return Err(format!("at most {RULES_MAX} fault rules per export"));
        }
        Ok(Policy {
            rules,
            state: DeviceState::Normal,
            seed,
            rng: fastrand::Rng::with_seed(seed),
            sequence: 0,
            injected: 0,
        })
    }

    /// Parses whitespace- or semicolon-separated rules.
    pub fn parse_rules(text: &str) -> Result<Vec<Rule>, String> {
        text.split([';', ' ', '\n'])
            .filter(|r| !r.trim().is_empty())
            .map(Rule::parse)
            .collect()
    }

    /// Whether anything can fire (the data plane skips [`Policy::decide`] otherwise).
    pub fn is_active(&self) -> bool {
        !self.rules.is_empty() || self.state != DeviceState::Normal
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected
    }

    /// Sets the device state.
    pub fn set_state(&mut self, state: DeviceState) {
        self.state = state;
    }

    /// The device state.
    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// Decides the fate of one request. The first firing error rule wins; delays add up.
    pub fn decide(&mut self, op: FaultOp, offset: u64, length: u64) -> Decision {
        self.sequence += 1;
        let mut decision = Decision {
            sequence: self.sequence,
            ..Decision::default()
        };
        let writes = matches!(op, FaultOp::Write | FaultOp::Trim | FaultOp::Zero);
        match self.state {
            DeviceState::Failing => decision.error = Some(NbdErrno::Io),
            DeviceState::ReadOnly if writes => decision.error = Some(NbdErrno::Perm),
            _ => {}
        }
        let end = offset.saturating_add(length.max(1));
        for rule in &mut self.rules {
            if !rule.op.matches(op) || rule.fired >= rule.count {
                continue;
            }
            if let Some((start, stop)) = rule.range
                && (end <= start || offset >= stop)
            {
                continue;
            }
            rule.matched += 1;
            if rule.matched <= rule.after || (rule.matched - rule.after) % rule.every != 0 {
                continue;
            }
            if rule.probability < 1.0 && self.rng.f64() >= rule.probability {
                continue;
            }
            match rule.effect {
                Effect::Error(errno) if decision.error.is_none() => {
                    decision.error = Some(errno);
                    rule.fired += 1;
                }
                Effect::Error(_) => {}
                Effect::Delay(delay) => {
                    decision.delay = Some(decision.delay.unwrap_or_default() + delay);
                    rule.fired += 1;
                }
                Effect::DelayUniform(min, max) => {
                    let span = (max - min).as_micros() as u64;
                    let delay = min + Duration::from_micros(self.rng.u64(0..=span));
                    decision.delay = Some(decision.delay.unwrap_or_default() + delay);
                    rule.fired += 1;
                }
            }
        }
        if decision.error.is_some() || decision.delay.is_some() {
            self.injected += 1;
        }
        decision
    }

    /// A human-readable dump (control socket `show`).
    pub fn describe(&self) -> String {
        let rules: Vec<String> = self.rules.iter().map(Rule::render).collect();
        format!(
            "state={:?} seed={} requests={} injected={} rules=[{}]",
            self.state,
            self.seed,
            self.sequence,
            self.injected,
            rules.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &str, seed: u64) -> Policy {
        Policy::new(Policy::parse_rules(rules).unwrap(), seed).unwrap()
    }

    #[test]
    fn rules_parse_and_render_round_trip() {
        for text in [
            "error:write:errno=ENOSPC",
            "error:any:errno=EIO,p=0.25,every=3,after=10,count=2,range=0-4096",
            "delay:read:ms=5",
            "delay:flush:min=1,max=9",
        ] {
            let rule = Rule::parse(text).unwrap();
            assert_eq!(Rule::parse(&rule.render()).unwrap(), rule, "{text}");
        }
        for bad in [
            "error",
            "boom:read",
            "error:read:errno=EFOO",
            "error:read:p=2",
            "delay:read",
            "delay:read:min=5,max=1",
            "error:read:ms=3",
            "error:read:range=9-3",
            "error:read:wat=1",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn schedules_fire_exactly_where_configured() {
        let mut p = policy("error:write:after=2,every=3,count=2", 1);
        let fired: Vec<u64> = (1..=20)
            .filter_map(|n| p.decide(FaultOp::Write, 0, 512).error.map(|_| n))
            .collect();
        assert_eq!(fired, vec![5, 8]);
        assert!(
            p.decide(FaultOp::Read, 0, 512).error.is_none(),
            "reads unaffected"
        );
    }

    #[test]
    fn ranges_filter_by_overlap() {
        let mut p = policy("error:read:range=4096-8192,errno=EIO", 1);
        assert!(p.decide(FaultOp::Read, 0, 4096).error.is_none());
        assert_eq!(p.decide(FaultOp::Read, 4000, 200).error, Some(NbdErrno::Io));
        assert!(p.decide(FaultOp::Read, 8192, 10).error.is_none());
    }

    #[test]
    fn same_seed_same_faults() {
        let run = |seed| {
            let mut p = policy("error:any:p=0.3 delay:read:min=0,max=10", seed);
            (0..500)
                .map(|n| p.decide(FaultOp::Read, n * 512, 512))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let errors = run(42).iter().filter(|d| d.error.is_some()).count();
        assert!((100..200).contains(&errors), "p=0.3 of 500 gave {errors}");
    }

    #[test]
    fn device_states_override_rules() {
        let mut p = policy("", 0);
        assert!(!p.is_active());
        p.set_state(DeviceState::ReadOnly);
        assert!(p.is_active());
        assert_eq!(p.decide(FaultOp::Write, 0, 1).error, Some(NbdErrno::Perm));
        assert_eq!(p.decide(FaultOp::Read, 0, 1).error, None);
        p.set_state(DeviceState::Failing);
        assert_eq!(p.decide(FaultOp::Read, 0, 1).error, Some(NbdErrno::Io));
        p.set_state(DeviceState::Normal);
        assert!(!p.is_active());
    }
}
