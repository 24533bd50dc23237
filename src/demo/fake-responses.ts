// The Responses half of the fake OhMyGPT (fake-ohmygpt.ts): it "generates" an echo of the input, in OpenAI's
// shapes, as one JSON answer or as Server-Sent Events with a pause between events, and keeps what it made so it
// can be retrieved, cancelled, deleted and listed. Usage numbers are deterministic (words in, words out), so tests
// can charge token budgets from them.
import { randomBytes } from 'node:crypto'
import type { IncomingMessage, ServerResponse } from 'node:http'

interface Item { id: string, type: string, [k: string]: unknown }

export interface StoredResponse {
  id: string
  object: 'response'
  created_at: number
  status: 'completed' | 'in_progress' | 'cancelled'
  model: string
  output: Item[]
  usage: { input_tokens: number, output_tokens: number, total_tokens: number }
  metadata: Record<string, string>
  conversation: { id: string } | null
  previous_response_id: string | null
  background: boolean
}

export interface ResponsesOptions {
  /** pause between two streamed events */
  streamDelayMs?: number
  /**
   * how long a stream's connection is held open after its last event before it is ended (a relay that holds it open
   * once the answer is done)
   */
  holdOpenMs?: number
  /**
   * told when a stream ends: finished, cut off by the client before its last event (closed), or after it, while
   * held open (released)
   */
  onStreamEnd?: (how: 'finished' | 'closed' | 'released', sent: number) => void
}

/** What the Responses half needs of the Conversations half: find a conversation, add items to it. */
export interface ConversationStore {
  has (id: string): boolean
  append (id: string, items: Item[]): void
}

type Send = (res: ServerResponse, status: number, body: unknown) => void
type NotFound = (res: ServerResponse, what: string) => void

/** Models that reason first: their output starts with a reasoning item, as OpenAI's o-series and GPT-5 do. */
const REASONING_MODEL = /^(?:o\d|gpt-5)/

function newId (prefix: string): string {
  return `${prefix}_${randomBytes(12).toString('hex')}`
}

/** The input as items, and its text for the echo. */
function inputItems (input: unknown): Item[] {
  if (typeof input === 'string') return [{ id: newId('msg'), type: 'message', role: 'user', content: [{ type: 'input_text', text: input }] }]
  if (!Array.isArray(input)) return []
  return input.map(i => ({ id: newId('msg'), type: 'message', ...(i as Record<string, unknown>) }) as Item)
}

function textOf (items: Item[]): string {
  return items.map(item => {
    const content = item.content
    if (typeof content === 'string') return content
    if (Array.isArray(content)) return content.map(c => String((c as { text?: unknown } | null)?.text ?? '')).join(' ')
    return ''
  }).join(' ').trim()
}

function words (text: string): string[] {
  return text.split(/\s+/).filter(Boolean)
}

export function createResponsesHandler (conversations: ConversationStore, send: Send, notFound: NotFound, opts: ResponsesOptions = {}) {
  const responses = new Map<string, { response: StoredResponse, input: Item[] }>()
  /** Reasoning items made, by id: one passed back without its encrypted_content is read from here, as OpenAI does. */
  const reasoning = new Map<string, Item>()
  const seq = { n: 0 }

  function create (res: ServerResponse, body: Record<string, unknown>): void {
    if (typeof body.model !== 'string' || body.model === '') {
      send(res, 400, { error: { message: "Missing required parameter: 'model'.", type: 'invalid_request_error', param: 'model', code: 'missing_required_parameter' } })
      return
    }
    const conversationId = typeof body.conversation === 'string' ? body.conversation : (body.conversation as { id?: string } | undefined)?.id
    if (conversationId !== undefined && !conversations.has(conversationId)) {
      notFound(res, `Conversation with id '${conversationId}'`)
      return
    }
    const previous = typeof body.previous_response_id === 'string' ? body.previous_response_id : null
    if (previous !== null && !responses.has(previous)) {
      notFound(res, `Previous response with id '${previous}'`)
      return
    }
    const input = inputItems(body.input)
    const unknownReasoning = input.find(item => item.type === 'reasoning' && typeof item.encrypted_content !== 'string' && !reasoning.has(item.id))
    if (unknownReasoning !== undefined) {
      notFound(res, `Item with id '${unknownReasoning.id}'`)
      return
    }
    const inputText = textOf(input.filter(item => item.type !== 'reasoning'))
    const outputWords = ['Echo:', ...words(inputText)]
    const message: Item = {
      id: newId('msg'), type: 'message', status: 'completed', role: 'assistant',
      content: [{ type: 'output_text', text: outputWords.join(' '), annotations: [] }]
    }
    const output: Item[] = [message]
    if (REASONING_MODEL.test(body.model)) {
      const thought: Item = { id: newId('rs'), type: 'reasoning', summary: [{ type: 'summary_text', text: `Thinking about: ${inputText}` }] }
      reasoning.set(thought.id, thought)
      const include = Array.isArray(body.include) ? body.include : []
      output.unshift(include.includes('reasoning.encrypted_content') ? { ...thought, encrypted_content: `gAAAA${randomBytes(8).toString('hex')}` } : thought)
    }
    const response: StoredResponse = {
      id: newId('resp'), object: 'response', created_at: Math.floor(Date.now() / 1000), status: 'completed',
      model: body.model, output,
      usage: { input_tokens: Math.max(1, words(inputText).length), output_tokens: outputWords.length, total_tokens: 0 },
      metadata: (body.metadata as Record<string, string> | undefined) ?? {},
      conversation: conversationId === undefined ? null : { id: conversationId },
      previous_response_id: previous,
      background: body.background === true
    }
    response.usage.total_tokens = response.usage.input_tokens + response.usage.output_tokens
    if (response.background) response.status = 'in_progress'
    responses.set(response.id, { response, input })
    if (conversationId !== undefined) conversations.append(conversationId, [...input, ...output])
    if (body.stream === true) stream(res, response, outputWords)
    // A background response is answered queued, before the model ran: its output comes with a retrieve or a cancel.
    else send(res, 200, response.background ? { ...response, status: 'queued', output: [] } : response)
  }

  /** The events OpenAI sends for one text answer, one word a delta, with a pause between events. */
  function stream (res: ServerResponse, response: StoredResponse, outputWords: string[]): void {
    const at = response.output.length - 1
    const message = response.output[at]!
    const inProgress = { ...response, status: 'in_progress', output: [], usage: null }
    const events: Array<Record<string, unknown>> = [
      { type: 'response.created', response: inProgress },
      { type: 'response.in_progress', response: inProgress },
      ...response.output.slice(0, at).flatMap((item, i) => [
        { type: 'response.output_item.added', output_index: i, item: { ...item, summary: [] } },
        { type: 'response.output_item.done', output_index: i, item }
      ]),
      { type: 'response.output_item.added', output_index: at, item: { ...message, status: 'in_progress', content: [] } },
      { type: 'response.content_part.added', item_id: message.id, output_index: at, content_index: 0, part: { type: 'output_text', text: '', annotations: [] } },
      ...outputWords.map((word, i) => ({
        type: 'response.output_text.delta', item_id: message.id, output_index: at, content_index: 0, delta: i === 0 ? word : ` ${word}`
      })),
      { type: 'response.output_text.done', item_id: message.id, output_index: at, content_index: 0, text: outputWords.join(' ') },
      { type: 'response.output_item.done', output_index: at, item: message },
      { type: 'response.completed', response }
    ]
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache' })
    let sent = 0
    let timer: NodeJS.Timeout | null = null
    res.on('close', () => {
      if (timer !== null) clearTimeout(timer)
      if (sent < events.length) opts.onStreamEnd?.('closed', sent)
      else if (!res.writableEnded) opts.onStreamEnd?.('released', sent)
    })
    const next = () => {
      if (res.destroyed) return
      const event: Record<string, unknown> = { ...events[sent]!, sequence_number: seq.n++ }
      res.write(`event: ${String(event.type)}\ndata: ${JSON.stringify(event)}\n\n`)
      sent++
      if (sent === events.length) {
        const end = () => {
          if (res.destroyed) return
          res.end()
          opts.onStreamEnd?.('finished', sent)
        }
        if (opts.holdOpenMs === undefined) end()
        else timer = setTimeout(end, opts.holdOpenMs)
        return
      }
      timer = setTimeout(next, opts.streamDelayMs ?? 0)
    }
    next()
  }

  return function handleResponses (req: IncomingMessage, res: ServerResponse, body: Record<string, unknown>, parts: string[]): void {
    const method = req.method ?? 'GET'
    if (parts.length === 0) {
      if (method === 'POST') return create(res, body)
      return notFound(res, `Route ${method} /v1/responses`)
    }
    const found = responses.get(parts[0]!)
    if (found === undefined) return notFound(res, `Response with id '${parts[0]}'`)
    const route = `${method} ${parts.slice(1).join('/')}`
    switch (route) {
      case 'GET ': return send(res, 200, found.response)
      case 'DELETE ':
        responses.delete(found.response.id)
        return send(res, 200, { id: found.response.id, object: 'response', deleted: true })
      case 'POST cancel':
        if (!found.response.background) {
          return send(res, 400, { error: { message: 'Only responses created with background set to true can be cancelled.', type: 'invalid_request_error', param: null, code: null } })
        }
        found.response.status = 'cancelled'
        return send(res, 200, found.response)
      case 'GET input_items':
        return send(res, 200, { object: 'list', data: found.input, first_id: found.input[0]?.id ?? null, last_id: found.input.at(-1)?.id ?? null, has_more: false })
      default:
        return notFound(res, `Route ${method} /v1/responses/${parts.join('/')}`)
    }
  }
}
