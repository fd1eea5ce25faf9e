//! The proxy's routing table: the releases that get requests, each with a
//! weight and rules. The proxy swaps a whole table at once (one pointer),
//! so a request sees either the old table or the new one, never a mix.
//!
//! A service's table holds one route of weight 100 (or none: 502), or,
//! while a side release runs beside the serving one, those two divided by a
//! split (`cohort`): sticky per client, so no random draw. Weights and
//! header rules route among any number of releases at random.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::cohort::Cohorts;
use super::Upstream;

/// The weight of a route that takes all the traffic no rule claims.
pub const ALL_TRAFFIC: u32 = 100;

/// Sends a request whose header `name` is exactly `value` to a route,
/// whatever the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    pub name: HeaderName,
    pub value: HeaderValue,
}

impl HeaderRule {
    fn matches(&self, headers: &HeaderMap) -> bool {
        headers.get_all(&self.name).iter().any(|v| v == self.value)
    }
}

/// One release in a table.
pub struct Route {
    pub upstream: Arc<Upstream>,
    /// Its share of the requests no rule claimed, relative to the others'.
    pub weight: u32,
    /// Requests matching any of these go here before weights are looked at.
    pub rules: Vec<HeaderRule>,
}

/// An immutable set of routes; the proxy replaces it, never edits it.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Sum of the weights, kept so a pick does not add them up per request.
    total_weight: u64,
    /// Set for a table of the serving release (the first route) and a
    /// side release (the second): the split decides, not `pick`.
    split: Option<Cohorts>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        let total_weight = routes.iter().map(|r| u64::from(r.weight)).sum();
        Self {
            routes,
            total_weight,
            split: None,
        }
    }

    /// The serving release and a side release, divided by `cohorts` (the
    /// routes' weights say the same, for whoever lists them).
    pub fn split(mut serving: Route, mut side: Route, cohorts: Cohorts) -> Self {
        side.weight = cohorts.split().weight;
        serving.weight = ALL_TRAFFIC - side.weight;
        Self {
            split: Some(cohorts),
            ..Self::new(vec![serving, side])
        }
    }

    /// The split of a table of a serving and a side release: it, and the
    /// two routes.
    pub fn cohorts(&self) -> Option<(&Cohorts, &Route, &Route)> {
        match (&self.split, self.routes.as_slice()) {
            (Some(cohorts), [serving, side]) => Some((cohorts, serving, side)),
            _ => None,
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether `upstream` (this very one, not another of the same release)
    /// is still routed to.
    pub fn contains(&self, upstream: &Arc<Upstream>) -> bool {
        self.routes
            .iter()
            .any(|r| Arc::ptr_eq(&r.upstream, upstream))
    }

    /// Whether a route has rules: picking reads the request's headers.
    pub fn has_rules(&self) -> bool {
        self.routes.iter().any(|route| !route.rules.is_empty())
    }

    /// The route of `release`, if the table has one.
    pub fn get(&self, release: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.upstream.release() == release)
    }

    /// Where a request with `headers` goes: the first route with a rule it
    /// matches, else one drawn by weight. `roll(n)` must return a number in
    /// `0..n`; it is only asked when more than one route has weight, so a
    /// table of one route never costs a random draw. `None` when nothing
    /// takes the request (no route, or only weightless ones it matches no
    /// rule of).
    pub fn pick(&self, headers: &HeaderMap, roll: impl FnOnce(u64) -> u64) -> Option<&Route> {
        if let Some(ruled) = self
            .routes
            .iter()
            .find(|r| r.rules.iter().any(|rule| rule.matches(headers)))
        {
            return Some(ruled);
        }
        if self.total_weight == 0 {
            return None;
        }
        let weighted = || self.routes.iter().filter(|r| r.weight > 0);
        if let Some(only) = weighted().find(|r| u64::from(r.weight) == self.total_weight) {
            return Some(only);
        }
        let mut point = roll(self.total_weight);
        for route in weighted() {
            let weight = u64::from(route.weight);
            if point < weight {
                return Some(route);
            }
            point -= weight;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn route(release: &str, weight: u32, rules: Vec<HeaderRule>) -> Route {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        Route {
            upstream: Arc::new(Upstream::new(
                release,
                &[crate::proxy::BackendSpec::at(addr)],
                Default::default(),
            )),
            weight,
            rules,
        }
    }

    fn canary_header() -> HeaderRule {
        HeaderRule {
            name: HeaderName::from_static("x-canary"),
            value: HeaderValue::from_static("1"),
        }
    }

    fn picked(table: &RouteTable, headers: &HeaderMap, roll: u64) -> Option<String> {
        table
            .pick(headers, |n| {
                assert!(roll < n, "the roll is within the total weight");
                roll
            })
            .map(|r| r.upstream.release().to_string())
    }

    #[test]
    fn weighted_pick_follows_the_random_source() {
        let table = RouteTable::new(vec![
            route("stable", 90, vec![]),
            route("canary", 10, vec![]),
        ]);
        let none = HeaderMap::new();
        assert_eq!(picked(&table, &none, 0).as_deref(), Some("stable"));
        assert_eq!(picked(&table, &none, 89).as_deref(), Some("stable"));
        assert_eq!(picked(&table, &none, 90).as_deref(), Some("canary"));
        assert_eq!(picked(&table, &none, 99).as_deref(), Some("canary"));
    }

    #[test]
    fn weightless_routes_get_nothing_by_weight() {
        let table = RouteTable::new(vec![
            route("standby", 0, vec![]),
            route("stable", 3, vec![]),
            route("canary", 1, vec![]),
        ]);
        let none = HeaderMap::new();
        assert_eq!(picked(&table, &none, 0).as_deref(), Some("stable"));
        assert_eq!(picked(&table, &none, 3).as_deref(), Some("canary"));
    }

    #[test]
    fn one_weighted_route_takes_everything_without_a_draw() {
        let table = RouteTable::new(vec![
            route("standby", 0, vec![]),
            route("v1", ALL_TRAFFIC, vec![]),
        ]);
        let route = table.pick(&HeaderMap::new(), |_| panic!("no draw for a single route"));
        assert_eq!(route.unwrap().upstream.release(), "v1");
    }

    #[test]
    fn a_header_rule_matches_before_weights() {
        let table = RouteTable::new(vec![
            route("stable", ALL_TRAFFIC, vec![]),
            route("canary", 0, vec![canary_header()]),
        ]);
        let mut headers = HeaderMap::new();
        headers.insert("x-canary", HeaderValue::from_static("1"));
        let route = table.pick(&headers, |_| panic!("a rule matched, no draw"));
        assert_eq!(route.unwrap().upstream.release(), "canary");

        headers.insert("x-canary", HeaderValue::from_static("0"));
        assert_eq!(picked(&table, &headers, 0).as_deref(), Some("stable"));
    }

    #[test]
    fn nothing_takes_a_request_of_an_empty_or_weightless_table() {
        let none = HeaderMap::new();
        assert!(picked(&RouteTable::default(), &none, 0).is_none());
        let weightless = RouteTable::new(vec![route("canary", 0, vec![canary_header()])]);
        assert!(picked(&weightless, &none, 0).is_none());
    }

    #[test]
    fn contains_means_this_very_upstream() {
        let table = RouteTable::new(vec![route("v1", ALL_TRAFFIC, vec![])]);
        let same = table.get("v1").unwrap().upstream.clone();
        let other = route("v1", ALL_TRAFFIC, vec![]).upstream;
        assert!(table.contains(&same));
        assert!(!table.contains(&other));
    }
}
