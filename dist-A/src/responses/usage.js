// What a Responses call was about and what it cost, gathered from its request and from its answer (one JSON
// object, or the events of a stream as they pass): for the audit record and the client's token budget.
export function newFacts(responseId, stream, model = null) {
    return { model, stream, responseId, inputTokens: null, outputTokens: null, deltas: 0 };
}
function count(value) {
    return typeof value === 'number' && Number.isFinite(value) && value >= 0 ? value : null;
}
/** Takes what a response object says (id, model, usage) into the facts; the object is not changed. */
export function observeResponse(facts, object) {
    const response = object;
    if (response?.object !== 'response')
        return;
    if (facts.responseId === null && typeof response.id === 'string')
        facts.responseId = response.id;
    if (facts.model === null && typeof response.model === 'string')
        facts.model = response.model;
    const usage = response.usage;
    if (usage !== null && typeof usage === 'object') {
        facts.inputTokens = count(usage.input_tokens) ?? facts.inputTokens;
        facts.outputTokens = count(usage.output_tokens) ?? facts.outputTokens;
    }
}
/** Takes one streamed event into the facts: the response object it carries, or one more output delta. */
export function observeEvent(facts, event) {
    const e = event;
    if (e?.type === 'response.output_text.delta')
        facts.deltas++;
    if (e?.response !== undefined)
        observeResponse(facts, e.response);
}
/**
 * Output tokens as known: the answer's usage when it came; for a stream cut off before, the deltas seen (OpenAI
 * streams text about a token a delta, so this is an estimate, and the budget is charged with it rather than with
 * nothing).
 */
export function outputTokens(facts) {
    return facts.outputTokens ?? (facts.deltas > 0 ? facts.deltas : null);
}
export function tokensUsed(facts) {
    return (facts.inputTokens ?? 0) + (outputTokens(facts) ?? 0);
}
const patterns = new Map();
/** A model glob as a RegExp: `*` any run of characters (slashes too: model ids are not paths), `?` one. */
function globToRegExp(glob) {
    let re = patterns.get(glob);
    if (re === undefined) {
        const body = glob.split('').map(c => c === '*' ? '.*' : c === '?' ? '.' : c.replace(/[\\^$.|+()[\]{}]/g, '\\$&')).join('');
        re = new RegExp(`^${body}$`, 's');
        patterns.set(glob, re);
    }
    return re;
}
/** Whether `model` is one the client may use: any model when it has no list. */
export function modelAllowed(model, allowed) {
    return allowed === undefined || allowed.some(glob => globToRegExp(glob).test(model));
}
//# sourceMappingURL=usage.js.map