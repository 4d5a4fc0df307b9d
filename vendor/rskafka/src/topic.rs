use std::collections::BTreeSet;

#[derive(Debug)]
pub struct Topic {
    pub name: String,
    pub partitions: BTreeSet<i32>,
}

/// pg2ch addition: a topic's partitions with their replicas, as the
/// cluster's metadata describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicReplicas {
    pub name: String,
    pub partitions: Vec<PartitionReplicas>,
}

/// pg2ch addition: one partition's leader, replicas and in-sync replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReplicas {
    pub partition: i32,
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub in_sync: Vec<i32>,
}

/// pg2ch addition: how many brokers the cluster has, and its topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterReplicas {
    pub brokers: usize,
    pub topics: Vec<TopicReplicas>,
}
