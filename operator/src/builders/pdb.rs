//! The PodDisruptionBudget: voluntary disruptions never take down more than
//! `disruptionBudget.maxUnavailable` members (default 1).

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildError, Names, member_selector, meta};
use crate::crd::MailCluster;

/// The PodDisruptionBudget of the members.
pub fn pdb(mc: &MailCluster) -> Result<PodDisruptionBudget, BuildError> {
    let names = Names::of(mc)?;
    Ok(PodDisruptionBudget {
        metadata: meta(mc, &names, names.statefulset(), "members"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(mc.spec.max_unavailable())),
            selector: Some(member_selector(&names)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;
    use crate::crd::DisruptionBudget;

    #[test]
    fn one_member_at_a_time_by_default() {
        let p = pdb(&sample()).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert!(
            spec.selector
                .unwrap()
                .match_labels
                .unwrap()
                .contains_key("app.kubernetes.io/instance")
        );
    }

    #[test]
    fn max_unavailable_from_the_spec() {
        let mut mc = sample();
        mc.spec.disruption_budget = Some(DisruptionBudget {
            max_unavailable: Some(2),
        });
        let spec = pdb(&mc).unwrap().spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(2)));
    }
}
