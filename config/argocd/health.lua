-- Argo CD health of bitsmith Packages and Droplets (bitsmith.dev), read from their status: the Cloud Foundry
-- state and the kstatus conditions Ready, Reconciling and Stalled.
--   Healthy      READY (Package) or STAGED (Droplet), the current generation, nothing in flight
--   Progressing  not yet seen, an older generation, or bits being fetched, copied or uploaded
--   Degraded     FAILED, or Stalled (retrying cannot help: see the message)
--   Suspended    AWAITING_UPLOAD: waiting for someone to upload the bits; EXPIRED: past retention, its bits
--                removed on purpose (final, and nothing to repair); spec.suspend (Reconciling False, Suspended)
-- Stored bits found missing or corrupt (reason BlobMissing / BlobCorrupt) are Progressing while they are fetched
-- again, Degraded when they were uploaded and cannot be. A pinned source that changed to other bits
-- (SourceVerified False) stays Healthy, since the bits that match stay; the message says what the source did.
local hs = {}
local status = obj.status
if status == nil or status.state == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for bitsmith to pick it up"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. generation .. " to be processed"
  return hs
end

local function condition(type)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == type then
      return c
    end
  end
  return nil
end

if status.state == "EXPIRED" then
  local ready = condition("Ready")
  hs.status = "Suspended"
  hs.message = (ready and ready.message) or "Expired"
  return hs
end

local stalled = condition("Stalled")
if status.state == "FAILED" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  hs.message = status.error or (stalled and stalled.message) or status.state
  return hs
end

local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "False" and reconciling.reason == "Suspended" then
  hs.status = "Suspended"
  hs.message = reconciling.message
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = reconciling.message or reconciling.reason
  return hs
end

if status.state == "READY" or status.state == "STAGED" then
  local ready = condition("Ready")
  local verified = condition("SourceVerified")
  hs.status = "Healthy"
  hs.message = (ready and ready.message) or status.state
  if verified ~= nil and verified.status == "False" then
    hs.message = verified.message
  end
  return hs
end

if status.state == "AWAITING_UPLOAD" then
  hs.status = "Suspended"
  hs.message = "Waiting for bits to be uploaded"
  return hs
end

hs.status = "Progressing"
hs.message = status.state
return hs
