// A value at once or a promise of it: the in-memory rate-limit store and the owner cache answer at once (no promise
// per call on the hot path), the Redis store and an upstream lookup later. The hooks that ask them go on without
// making a promise when there is none.
/** `next` of the value: at once for a value, once it has come for a promise. */
export function then(value, next) {
    return value instanceof Promise ? value.then(next) : next(value);
}
/**
 * Asks and runs `then` on the answer: now when it is one, later when it is a promise. A failure to ask (a throw) or
 * to answer (a rejection) goes to `fail`.
 */
export function whenAnswered(ask, then, fail) {
    let answer;
    try {
        answer = ask();
    }
    catch (err) {
        fail(err);
        return;
    }
    if (answer instanceof Promise)
        answer.then(then, fail);
    else
        then(answer);
}
//# sourceMappingURL=answer.js.map