data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_region" "current" {}

locals {
  partition = data.aws_partition.current.partition
  region    = data.aws_region.current.name
  account   = data.aws_caller_identity.current.account_id

  automation = var.dispatch == "automation"

  # The kmskeys name grammar (kmskeys/names.py), as SSM's allowedPattern: SSM refuses any other
  # value before a single host is contacted, and the script checks each name again.
  name_re = "[A-Za-z0-9][A-Za-z0-9_./@+-]{0,199}"
  # Id: up to 20 space-separated names (Source = name), a Secrets Manager name or ARN, or a
  # parameter name with its leading /. No character of it has a meaning to the shell, and it
  # only ever reaches the script as an environment variable.
  id_pattern          = "^(arn:aws[a-z-]{0,10}:secretsmanager:[a-z0-9-]{1,30}:[0-9]{12}:secret:|/)?${local.name_re}( ${local.name_re}){0,19}$"
  prefix_pattern      = "^[a-z][a-z0-9_-]{0,31}$"
  path_prefix_pattern = "^([A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}/){0,10}$"
  jitter_pattern      = "^([0-9]|[1-9][0-9]|[1-5][0-9][0-9]|600)$"

  # The document's parameters, shared by the command document and the runbook in front of it.
  parameters = {
    Source = {
      type              = "String"
      description       = "What Id names: name (space-separated kmskeys names), secretsmanager (a secret's name or ARN) or parameterstore (a parameter's name)."
      allowedValues     = ["name", "secretsmanager", "parameterstore"]
      default           = "name"
      interpolationType = "ENV_VAR"
    }
    Id = {
      type              = "String"
      description       = "The names the event concerns (see Source)."
      allowedPattern    = local.id_pattern
      interpolationType = "ENV_VAR"
    }
    Prefix = {
      type              = "String"
      description       = "The kmskeys description prefix to flush under (kms, sm, ssm)."
      allowedPattern    = local.prefix_pattern
      interpolationType = "ENV_VAR"
    }
    PathPrefix = {
      type              = "String"
      description       = "Removed from a secret's or parameter's name to give the kmskeys name; names outside it flush nothing."
      allowedPattern    = local.path_prefix_pattern
      default           = ""
      interpolationType = "ENV_VAR"
    }
    JitterSeconds = {
      type              = "String"
      description       = "Wait a random 0..N seconds before flushing."
      allowedPattern    = local.jitter_pattern
      default           = tostring(var.flush_jitter_seconds)
      interpolationType = "ENV_VAR"
    }
  }

  script = replace(file("${path.module}/flush.sh"), "@KMSKEYS@", var.kmskeys_path)

  command_document = {
    schemaVersion = "2.2"
    description   = "kmskeys: flush a rotated secret on this host, every uid's cached copy and the host cache, so that the next request resolves the new value."
    parameters    = local.parameters
    mainSteps = [
      {
        action       = "aws:runShellScript"
        name         = "flush"
        precondition = { StringEquals = ["platformType", "Linux"] }
        inputs = {
          runCommand     = split("\n", trimspace(local.script))
          timeoutSeconds = tostring(var.command_timeout_seconds)
        }
      },
    ]
  }

  command_document_name = "${var.name}-flush"
  command_document_arn  = "arn:${local.partition}:ssm:${local.region}:${local.account}:document/${local.command_document_name}"

  runbook_name = "${var.name}-rollout"
  # EventBridge starts a runbook by its automation-definition ARN, at its default version.
  runbook_target_arn = "arn:${local.partition}:ssm:${local.region}:${local.account}:automation-definition/${local.runbook_name}:$DEFAULT"

  targets = [{ Key = "tag:${var.target_tag_key}", Values = [var.target_tag_value] }]

  # Rate controls reach SSM only through the runbook's aws:runCommand step (EventBridge's Run
  # Command target has no field for them).
  runbook_document = {
    schemaVersion = "0.3"
    description   = "kmskeys: send the flush command to every host tagged ${var.target_tag_key}=${var.target_tag_value}, ${coalesce(var.max_concurrency, "10%")} at a time."
    assumeRole    = one(aws_iam_role.automation[*].arn)
    parameters    = { for k, p in local.parameters : k => { for f, v in p : f => v if f != "interpolationType" } }
    mainSteps = [
      {
        name   = "flush"
        action = "aws:runCommand"
        isEnd  = true
        inputs = {
          DocumentName   = local.command_document_name
          Targets        = local.targets
          MaxConcurrency = coalesce(var.max_concurrency, "10%")
          MaxErrors      = coalesce(var.max_errors, "10%")
          TimeoutSeconds = var.command_timeout_seconds
          Parameters     = { for k in keys(local.parameters) : k => ["{{ ${k} }}"] }
        }
      },
    ]
  }

  # --- events ---------------------------------------------------------------------------------

  secret_arn_head = "arn:${local.partition}:secretsmanager:${local.region}:${local.account}:secret:"
  # EventBridge content filters: a secret is named by name or by ARN in API calls, by ARN in
  # RotationSucceeded.
  secret_id_filter  = flatten([for p in var.secret_name_prefixes : [{ prefix = p }, { prefix = "${local.secret_arn_head}${p}" }]])
  secret_arn_filter = [for p in var.secret_name_prefixes : { prefix = "${local.secret_arn_head}${p}" }]
  put_calls         = contains(var.secretsmanager_api_calls, "PutSecretValue")
  other_calls       = [for c in var.secretsmanager_api_calls : c if c != "PutSecretValue"]

  # PutSecretValue stages AWSCURRENT unless it names other stages; a rotation function's
  # createSecret step stages AWSPENDING only, which no host serves by default.
  put_branches = [
    { eventName = ["PutSecretValue"], requestParameters = { versionStages = [{ exists = false }] } },
    { eventName = ["PutSecretValue"], requestParameters = { versionStages = [{ anything-but = ["AWSPENDING"] }] } },
  ]
  # As JSON text: the two shapes differ, and a conditional needs one type.
  sm_calls = jsondecode(local.put_calls ? jsonencode({
    "$or" = concat(length(local.other_calls) > 0 ? [{ eventName = local.other_calls }] : [], local.put_branches)
  }) : jsonencode({ eventName = local.other_calls }))
  sm_api_detail = merge(
    # Only calls that succeeded changed anything.
    { eventSource = ["secretsmanager.amazonaws.com"], errorCode = [{ exists = false }] },
    local.sm_calls,
    length(local.secret_id_filter) > 0 ? { requestParameters = { secretId = local.secret_id_filter } } : {},
  )

  parameter_filter = [for p in var.parameter_name_prefixes : { prefix = p }]

  # Document parameters as JSON text with input-transformer placeholders. Built as text:
  # jsonencode would escape the < and > of a placeholder. Every constant is a validated
  # variable (no quote, backslash, < or >), so the text is JSON.
  sm_input = format(
    "{\"Source\":[\"secretsmanager\"],\"Id\":[\"<id>\"],\"Prefix\":[%s],\"PathPrefix\":[%s]}",
    jsonencode(var.secretsmanager_prefix), jsonencode(var.secretsmanager_path_prefix),
  )
  ssm_input = format(
    "{\"Source\":[\"parameterstore\"],\"Id\":[\"<id>\"],\"Prefix\":[%s],\"PathPrefix\":[%s]}",
    jsonencode(var.parameterstore_prefix), jsonencode(var.parameterstore_path_prefix),
  )

  # One rule per event shape: each needs its own path to the name. Patterns are JSON text so
  # that every rule has the same type.
  all_rules = {
    sm-api = {
      description = "Secrets Manager API calls that change a secret's current value or labels"
      pattern = jsonencode({
        source        = ["aws.secretsmanager"]
        "detail-type" = ["AWS API Call via CloudTrail"]
        detail        = local.sm_api_detail
      })
      paths    = { id = "$.detail.requestParameters.secretId" }
      template = local.sm_input
      input    = null
    }
    sm-rotation = {
      description = "Secrets Manager rotation finished (RotationSucceeded)"
      pattern = jsonencode({
        source        = ["aws.secretsmanager"]
        "detail-type" = ["AWS Service Event via CloudTrail"]
        detail = merge(
          { eventSource = ["secretsmanager.amazonaws.com"], eventName = ["RotationSucceeded"] },
          length(local.secret_arn_filter) > 0 ? { additionalEventData = { SecretId = local.secret_arn_filter } } : {},
        )
      })
      paths    = { id = "$.detail.additionalEventData.SecretId" }
      template = local.sm_input
      input    = null
    }
    ssm = {
      description = "Parameter Store parameter created, updated, deleted or relabelled"
      pattern = jsonencode({
        source        = ["aws.ssm"]
        "detail-type" = ["Parameter Store Change"]
        detail = merge(
          { operation = ["Create", "Update", "Delete", "LabelParameterVersion"] },
          length(local.parameter_filter) > 0 ? { name = local.parameter_filter } : {},
        )
      })
      paths    = { id = "$.detail.name" }
      template = local.ssm_input
      input    = null
    }
    kms = {
      description = "KMS key rotation of a kmskeys key"
      pattern = jsonencode({
        source        = ["aws.kms"]
        "detail-type" = ["KMS CMK Rotation"]
        resources     = var.kms_rotation_key_arns
      })
      paths    = null
      template = null
      input = jsonencode({
        Source = ["name"]
        Id     = [join(" ", var.kms_rotation_names)]
        Prefix = [var.kms_rotation_prefix]
      })
    }
    kmskeys = {
      description = "kmskeys Flush Request: a deploy step shipped a new value"
      pattern = jsonencode({
        source        = [local.custom_event_source]
        "detail-type" = [local.custom_event_detail_type]
        detail        = { prefix = var.custom_event_prefixes, name = [{ exists = true }] }
      })
      paths    = { name = "$.detail.name", prefix = "$.detail.prefix" }
      template = "{\"Source\":[\"name\"],\"Id\":[\"<name>\"],\"Prefix\":[\"<prefix>\"]}"
      input    = null
    }
  }
  enabled_rules = {
    sm-api      = var.secretsmanager_events
    sm-rotation = var.secretsmanager_events
    ssm         = var.parameterstore_events
    kms         = length(var.kms_rotation_key_arns) > 0
    kmskeys     = var.custom_events
  }
  rules                    = { for key, rule in local.all_rules : key => rule if local.enabled_rules[key] }
  custom_event_source      = "kmskeys"
  custom_event_detail_type = "kmskeys Flush Request"
}

# --- the documents ----------------------------------------------------------------------------

resource "aws_ssm_document" "flush" {
  name            = local.command_document_name
  document_type   = "Command"
  document_format = "JSON"
  content         = jsonencode(local.command_document)
  tags            = var.tags
}

resource "aws_ssm_document" "rollout" {
  count = local.automation ? 1 : 0

  name            = local.runbook_name
  document_type   = "Automation"
  document_format = "JSON"
  content         = jsonencode(local.runbook_document)
  tags            = var.tags
}

# --- EventBridge ------------------------------------------------------------------------------

resource "aws_cloudwatch_event_rule" "this" {
  for_each = local.rules

  name          = "${var.name}-${each.key}"
  description   = "kmskeys fleet flush: ${each.value.description}"
  event_pattern = each.value.pattern
  tags          = var.tags
}

resource "aws_cloudwatch_event_target" "this" {
  for_each = local.rules

  rule      = aws_cloudwatch_event_rule.this[each.key].name
  target_id = "kmskeys-flush"
  # Computed, not the document's own ARN attribute: an account's document ARN names the account.
  arn      = local.automation ? local.runbook_target_arn : local.command_document_arn
  role_arn = aws_iam_role.events.arn
  input    = each.value.input

  dynamic "input_transformer" {
    for_each = each.value.template == null ? [] : [1]

    content {
      input_paths    = each.value.paths
      input_template = each.value.template
    }
  }

  dynamic "run_command_targets" {
    for_each = local.automation ? [] : [1]

    content {
      key    = "tag:${var.target_tag_key}"
      values = [var.target_tag_value]
    }
  }

  depends_on = [aws_ssm_document.flush, aws_ssm_document.rollout]
}

# --- IAM: the role EventBridge assumes --------------------------------------------------------

data "aws_iam_policy_document" "events_trust" {
  statement {
    sid     = "EventBridgeForTheseRules"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com"]
    }

    # Confused deputy: only this account's rules of this module.
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }

    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = length(local.rules) > 0 ? [for r in aws_cloudwatch_event_rule.this : r.arn] : ["arn:${local.partition}:events:${local.region}:${local.account}:rule/${var.name}-none"]
    }
  }
}

resource "aws_iam_role" "events" {
  name                 = "${var.name}-events"
  description          = "kmskeys fleet flush: EventBridge starts the flush on the tagged hosts"
  assume_role_policy   = data.aws_iam_policy_document.events_trust.json
  permissions_boundary = var.permissions_boundary_arn
  tags                 = var.tags

  lifecycle {
    precondition {
      condition     = local.automation || (var.max_concurrency == null && var.max_errors == null)
      error_message = "dispatch = \"run_command\" cannot apply max_concurrency or max_errors (EventBridge's Run Command target has no rate controls): leave them null, or use dispatch = \"automation\"."
    }

    precondition {
      condition     = (length(var.kms_rotation_key_arns) > 0) == (length(var.kms_rotation_names) > 0)
      error_message = "kms_rotation_key_arns and kms_rotation_names go together: the rotation event names a key, not the secrets to flush."
    }
  }
}

# SendCommand of the flush document, to the tagged hosts only (ssm:resourceTag on the instance).
data "aws_iam_policy_document" "send_flush" {
  statement {
    sid       = "SendTheFlushDocument"
    effect    = "Allow"
    actions   = ["ssm:SendCommand"]
    resources = [local.command_document_arn]
  }

  statement {
    sid     = "ToTheTaggedHostsOnly"
    effect  = "Allow"
    actions = ["ssm:SendCommand"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*",
      "arn:${local.partition}:ssm:${local.region}:${local.account}:managed-instance/*",
    ]

    condition {
      test     = "StringEquals"
      variable = "ssm:resourceTag/${var.target_tag_key}"
      values   = [var.target_tag_value]
    }
  }
}

data "aws_iam_policy_document" "events" {
  source_policy_documents = local.automation ? [] : [data.aws_iam_policy_document.send_flush.json]

  dynamic "statement" {
    for_each = local.automation ? [1] : []

    content {
      sid       = "StartTheRolloutRunbook"
      effect    = "Allow"
      actions   = ["ssm:StartAutomationExecution"]
      resources = ["arn:${local.partition}:ssm:${local.region}:${local.account}:automation-definition/${local.runbook_name}:*"]
    }
  }

  dynamic "statement" {
    for_each = local.automation ? [1] : []

    content {
      sid       = "PassTheRunbookItsRole"
      effect    = "Allow"
      actions   = ["iam:PassRole"]
      resources = aws_iam_role.automation[*].arn

      condition {
        test     = "StringEquals"
        variable = "iam:PassedToService"
        values   = ["ssm.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "events" {
  name   = "kmskeys-fleet-flush"
  role   = aws_iam_role.events.id
  policy = data.aws_iam_policy_document.events.json
}

# --- IAM: the role the runbook runs as (dispatch = "automation") ------------------------------

data "aws_iam_policy_document" "automation_trust" {
  statement {
    sid     = "SystemsManagerAutomation"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ssm.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:ssm:${local.region}:${local.account}:automation-execution/*"]
    }
  }
}

resource "aws_iam_role" "automation" {
  count = local.automation ? 1 : 0

  name                 = "${var.name}-automation"
  description          = "kmskeys fleet flush: the runbook sends the flush document to the tagged hosts"
  assume_role_policy   = data.aws_iam_policy_document.automation_trust.json
  permissions_boundary = var.permissions_boundary_arn
  tags                 = var.tags
}

data "aws_iam_policy_document" "automation" {
  #checkov:skip=CKV_AWS_356:ListCommands, ListCommandInvocations and DescribeInstanceInformation take no resource ARN: IAM only accepts "*" for them, and they read command status, nothing else.
  source_policy_documents = [data.aws_iam_policy_document.send_flush.json]

  # aws:runCommand polls the command it sent until every host has answered.
  statement {
    sid       = "FollowTheCommand"
    effect    = "Allow"
    actions   = ["ssm:DescribeInstanceInformation", "ssm:ListCommandInvocations", "ssm:ListCommands"]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "automation" {
  count = local.automation ? 1 : 0

  name   = "kmskeys-fleet-flush"
  role   = aws_iam_role.automation[0].id
  policy = data.aws_iam_policy_document.automation.json
}
