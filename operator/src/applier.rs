//! The one way a reconcile writes a cluster's objects: server-side apply that skips objects
//! already as desired ([`apply::apply`]), deletes, and pruning by label of the objects no
//! longer wanted. Every write is counted in the metrics and recorded for the `Applied` event.

use std::fmt::Debug;

use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::apply::{self, ApplyError};

/// Applies and deletes for one reconcile, and remembers what it changed.
#[derive(Debug)]
pub struct Applier<'a> {
    writes: &'a Counter,
    done: Vec<String>,
}

impl<'a> Applier<'a> {
    /// An applier that counts its writes in `writes`.
    pub fn new(writes: &'a Counter) -> Self {
        Self {
            writes,
            done: Vec::new(),
        }
    }

    fn record(&mut self, what: String) {
        self.writes.inc();
        self.done.push(what);
    }

    /// Applies `desired` when the live object differs; returns the object as the API server
    /// has it.
    pub async fn apply<K>(&mut self, api: &Api<K>, desired: &K) -> Result<K, ApplyError>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
    {
        let applied = apply::apply(api, desired).await?;
        if applied.changed {
            self.record(format!("{} {}", K::kind(&()), applied.object.name_any()));
        }
        Ok(applied.object)
    }

    /// Deletes the object `name` if it exists; returns whether it did.
    pub async fn delete<K>(&mut self, api: &Api<K>, name: &str) -> Result<bool, ApplyError>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
    {
        let deleted = apply::delete_if_exists(api, name).await?;
        if deleted {
            self.record(format!("deleted {} {name}", K::kind(&())));
        }
        Ok(deleted)
    }

    /// Deletes the one object `name` of a kind that may not be installed (a CRD of another
    /// project): a kind the API server does not know has nothing to delete. By name, not by
    /// label: the operator may not list those kinds (least privilege, see the chart's RBAC).
    pub async fn delete_optional<K>(&mut self, api: &Api<K>, name: &str) -> Result<(), ApplyError>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
    {
        match self.delete(api, name).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Deletes the objects with the labels of `selector` that `keep` does not keep and that
    /// are not already being deleted.
    pub async fn prune<K>(
        &mut self,
        api: &Api<K>,
        selector: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(), ApplyError>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
    {
        let live = api
            .list_metadata(&ListParams::default().labels(selector))
            .await
            .map_err(|source| ApplyError::Kube {
                verb: "listing",
                kind: K::kind(&()).to_string(),
                name: format!("with labels {selector}"),
                source,
            })?;
        for obj in live {
            let name = obj.name_any();
            if obj.metadata.deletion_timestamp.is_none() && !keep(&name) {
                self.delete(api, &name).await?;
            }
        }
        Ok(())
    }

    /// What was written, for the `Applied` event; `None` when nothing was.
    pub fn summary(&self) -> Option<String> {
        (!self.done.is_empty()).then(|| format!("applied {}", self.done.join(", ")))
    }
}
