export { ClusterCache } from "./cache.js";
export type { CachedTable, ClusterCacheOptions, ClusterCacheStats } from "./cache.js";
