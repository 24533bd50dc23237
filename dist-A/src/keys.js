// The one place that turns a gateway key into what the config stores: the lowercase hex sha256 digest.
import { createHash, randomBytes } from 'node:crypto';
export const KEY_PREFIX = 'ogw_';
export function keyDigest(key) {
    return createHash('sha256').update(key, 'utf8').digest('hex');
}
/** 32 random bytes, base64url: 256 bits of entropy, safe in a header and a shell. */
export function generateKey() {
    return KEY_PREFIX + randomBytes(32).toString('base64url');
}
//# sourceMappingURL=keys.js.map